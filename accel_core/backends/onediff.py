from __future__ import annotations

from .base import Backend, MethodModule


class OneDiffBackend(Backend):
    """onediff's compiler API with its oneflow backend (or nexfort when oneflow is absent).

    Written against `onediff.infer_compiler.compile(module, backend=..., options=...)`.
    Untested here: oneflow has no wheel for Python 3.11+ and nexfort pins other torch builds.
    """

    name = "onediff"
    modes = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
    requires = ("onediff",)
    devices = ("cuda",)

    def available(self, device_type):
        from ..optional import is_available

        return super().available(device_type) and (is_available("oneflow") or is_available("nexfort"))

    def missing(self, device_type):
        from ..optional import is_available

        if is_available("onediff") and not (is_available("oneflow") or is_available("nexfort")):
            return "oneflow"
        return super().missing(device_type)

    def compile(self, fn, owner, config):
        from onediff.infer_compiler import compile as onediff_compile

        from ..optional import is_available

        module = MethodModule(fn, owner)
        if is_available("oneflow"):
            return onediff_compile(module, backend="oneflow")
        # nexfort takes inductor-style modes: "max-optimize:max-autotune:cudagraphs" etc.
        nexfort_mode = {"default": "max-optimize", "max-autotune-no-cudagraphs": "max-optimize:max-autotune",
                        "reduce-overhead": "max-optimize:cudagraphs", "max-autotune": "max-optimize:max-autotune:cudagraphs"}[config.mode]
        return onediff_compile(module, backend="nexfort", options={"mode": nexfort_mode, "dynamic": bool(config.dynamic)})
