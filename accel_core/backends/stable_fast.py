from __future__ import annotations

from .base import Backend


class StableFastBackend(Backend):
    """stable-fast (sfast): TorchScript tracing + fused kernels, optional CUDA graphs.

    Written against `sfast.jit.trace_helper.lazy_trace` and `sfast.cuda.graphs.make_dynamic_graphed_callable`.
    Untested here: stable-fast's wheels pin torch 2.2.2 / 2.3.0, and its 1.0.5 source does not
    build against torch 2.11 (docs/backends.md), so this has never run on the pack's torch.
    """

    name = "stable-fast"
    modes = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
    requires = ("sfast",)
    devices = ("cuda",)

    def available(self, device_type):
        from ..optional import load_error

        return super().available(device_type) and not load_error("sfast._C")

    def missing(self, device_type):
        from ..optional import is_available, load_error

        # Installed but built for another torch: sfast imports, its C extension does not.
        if is_available("sfast") and load_error("sfast._C"):
            return "sfast._C"
        return super().missing(device_type)

    def compile(self, fn, owner, config):
        from sfast.compilers.diffusion_pipeline_compiler import CompilationConfig, _build_ts_compiler
        from sfast.jit.trace_helper import lazy_trace

        from ..optional import is_available

        sf = CompilationConfig.Default()
        sf.enable_triton = is_available("triton")
        sf.enable_xformers = False  # attention is the cast node's choice (SDPA), not a global switch
        sf.enable_cuda_graph = config.mode in ("reduce-overhead", "max-autotune")
        traced = lazy_trace(fn, ts_compiler=_build_ts_compiler(sf), check_trace=False, strict=False)
        if sf.enable_cuda_graph:
            from sfast.cuda.graphs import make_dynamic_graphed_callable

            return make_dynamic_graphed_callable(traced)
        return traced
