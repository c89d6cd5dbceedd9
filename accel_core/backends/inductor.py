from __future__ import annotations

import torch

from .base import Backend


class InductorBackend(Backend):
    """torch.compile. Modes: default, max-autotune-no-cudagraphs, reduce-overhead (CUDA graphs), max-autotune."""

    name = "inductor"
    modes = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
    requires = ()
    devices = ("cuda", "cpu", "xpu", "mps")

    def compile(self, fn, owner, config):
        kwargs = dict(fullgraph=config.fullgraph, dynamic=config.dynamic, backend=config.torch_backend)
        inductor = config.torch_backend == "inductor"
        if getattr(config, "guards", "full") == "skip-module":
            # torch.compile takes a mode or options, not both: spell the mode out as its options.
            options = dict(torch._inductor.list_mode_options(config.mode)) if inductor else {}
            options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
            kwargs["options"] = options
        elif inductor and config.mode != "default":  # modes are inductor options; test backends take none
            kwargs["mode"] = config.mode
        return torch.compile(fn, **kwargs)
