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
        # Modes are inductor options; other dynamo backends (used by tests) take none.
        if config.torch_backend == "inductor" and config.mode != "default":
            kwargs["mode"] = config.mode
        return torch.compile(fn, **kwargs)
