"""`sd-accel bench`: the unaccelerated baseline and each acceleration side by side, in one process.

Default: an SD1.5-layout UNet (the real block structure, narrow widths) with seeded random
weights built in-process, sampled on the CPU at a small latent; it shows the CPU path
(bf16 + channels_last + inductor) against fp32 eager. `--device cuda --preset sd15-512|sdxl-1024`
runs real sizes; `--checkpoint FILE.safetensors` uses the user's UNet through diffusers'
single-file conversion; `--host comfy` drives ComfyUI's own loader, nodes and sampler.

Imports the core (`accel_core`), its host adapters and the ComfyUI nodes; none of them imports it.
"""
import importlib

# Loaded on first use, so `sd-accel --help` does not import torch.
_LAZY = {"BenchConfig": "measure", "BenchResult": "measure", "BenchRow": "measure", "run_bench": "run", "bench_config": "run",
         "make_random_lora": "synthetic", "FORMATS": "synthetic", "SD15": "models", "SDXL": "models", "PRESETS": "models"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
