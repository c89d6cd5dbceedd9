"""The `sd-accel` command (`python -m sd_accel.cli`): bench, backends, cache and serve.

It imports the core (`accel_core`), its host adapters and the ComfyUI nodes; none of them imports it.
`cli.bench` holds the benchmark's measuring code, `cli.serve` the Ray Serve deployment.
"""
