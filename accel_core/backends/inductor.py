from __future__ import annotations

import torch

from .base import Backend

# Python calls that dynamo writes into the graph for `sdpa_kernel(...)` blocks. ComfyUI on CUDA
# wraps every attention call in `sdpa_kernel(priority, set_priority=True)` (comfy/ops.py), and
# AOTAutograd's cache refuses graphs holding non-allowlisted calls: every process re-traced the
# whole UNet (6.6 s of a 15 s warm start on an H200) even with a full inductor cache. Both
# functions are pure in what they feed the graph: their arguments are constants baked into the
# FX graph, which is the cache key, and the backend they pick is resolved while tracing, so a
# cached graph is the one a re-trace would produce. Keyed by torch's version, as torch suggests.
CACHEABLE_CALLS = ("torch.nn.attention._backend_from_string", "torch.nn.attention._sdpa_kernel")


def _cacheable_calls() -> dict:
    import torch._inductor.config as ic

    marked = dict(getattr(ic, "unsafe_marked_cacheable_functions", {}) or {})  # keep the user's own
    marked.update({name: torch.__version__ for name in CACHEABLE_CALLS if name not in marked})
    return marked


class InductorBackend(Backend):
    """torch.compile. Modes: default, max-autotune-no-cudagraphs, reduce-overhead (CUDA graphs), max-autotune."""

    name = "inductor"
    modes = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
    requires = ()
    devices = ("cuda", "cpu", "xpu", "mps")

    def compile(self, fn, owner, config):
        kwargs = dict(fullgraph=config.fullgraph, dynamic=config.dynamic, backend=config.torch_backend)
        options = {}
        if config.torch_backend == "inductor":  # test backends ("eager", "aot_eager") take no inductor options
            # torch.compile takes a mode or options, not both: spell the mode out as its options.
            # They are inductor config patched for this compile only, nothing process-wide.
            options.update(torch._inductor.list_mode_options(config.mode))
            if hasattr(torch._inductor.config, "unsafe_marked_cacheable_functions"):
                options["unsafe_marked_cacheable_functions"] = _cacheable_calls()
        if getattr(config, "guards", "full") == "skip-module":  # torch.compile pops it for any backend
            options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        return torch.compile(fn, options=options or None, **kwargs)
