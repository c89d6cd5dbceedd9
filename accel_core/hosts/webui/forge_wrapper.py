"""The Forge `model_function_wrapper` SD Accel installs for one sampling pass, and the probe for
another script's `apply_model` wrapper (Forge Neo's "Torch Compile Integrated") it steps aside for."""
from __future__ import annotations

import inspect
import weakref

from torch import nn

from ...log import logger
from .lora import FusedLoras
from .options import Plan
from .runner import MISSING, Runner, build_runner


def host_compile(kmodel) -> str | None:
    """What else wraps the model's `apply_model` (Forge Neo's Torch Compile Integrated, another script), or None.

    KModel.apply_model is a method; a script that wraps it sets an instance attribute.
    """
    wrapped = vars(kmodel).get("apply_model") if isinstance(kmodel, nn.Module) else None
    if wrapped is None or (getattr(wrapped, "__self__", None) is kmodel and getattr(wrapped, "__func__", None) is getattr(type(kmodel), "apply_model", None)):
        return None  # none, or the model's own method put back (Neo's compile set to Disable does that)
    preset = getattr(kmodel, "_torch_compile_config", None)  # set by Neo's sd_forge_compile script
    if preset:
        return f"Forge Neo's Torch Compile Integrated (preset {preset[0] if isinstance(preset, tuple) else preset})"
    return f"another script's apply_model wrapper ({getattr(wrapped, '__qualname__', type(wrapped).__name__)})"


def _owner(apply_model):
    """The KModel an `apply_model` callable belongs to: a bound method, or a wrapper made with functools.wraps."""
    owner = getattr(apply_model, "__self__", None)
    if owner is None:
        try:
            owner = getattr(inspect.unwrap(apply_model), "__self__", None)
        except ValueError:  # a __wrapped__ cycle
            owner = None
    return owner


class ForgeWrapper:
    """Forge `model_function_wrapper`: routes the diffusion model's forward through SD Accel for one call.

    One per sampling pass (Forge rebuilds its UNet patcher before each). Forge deep-copies
    `model_options` on every clone; the copy is this same object (its state is this pass's).
    It never raises on its own account inside the sampler: when it cannot find the UNet, or
    another wrapper of `apply_model` appears, the call runs as Forge would make it.
    """

    def __init__(self, plan: Plan, previous=None, *, kmodel=None, specs=None, loras: FusedLoras | None = None, progress=None, swap=True):
        self.plan, self.previous, self.progress, self.swap = plan, previous, progress, swap
        self.specs = list(specs) if specs is not None else None
        self.loras = loras if loras is not None else FusedLoras()
        self.kmodel_ref = weakref.ref(kmodel) if isinstance(kmodel, nn.Module) else None
        self.runner: Runner | None = None
        self.unet_ref = None
        self.warned = False

    def __deepcopy__(self, memo):
        return self

    def _unet(self, apply_model):
        owner = _owner(apply_model)
        if owner is None and self.kmodel_ref is not None:
            owner = self.kmodel_ref()
        unet = getattr(owner, "diffusion_model", None)
        return (unet if isinstance(unet, nn.Module) else None), owner

    def _runner_for(self, unet, device_type):
        if self.unet_ref is None or self.unet_ref() is not unet:
            if self.specs is not None:
                # Fused now, after Forge has loaded the UNet and applied its own LoRAs for this pass.
                self.loras.fuse(unet, self.specs)
            self.runner = build_runner(unet, self.plan, device_type, self.progress)[0] if self.swap else None
            self.unet_ref = weakref.ref(unet)
        return self.runner

    def _through(self, apply_model, args):
        if self.previous is not None:
            return self.previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def __call__(self, apply_model, args: dict):
        unet, owner = self._unet(apply_model)
        if unet is None:
            self._warn("SD Accel: could not find the UNet behind this apply_model; this call runs without SD Accel.")
            return self._through(apply_model, args)
        runner = self._runner_for(unet, args["input"].device.type)
        if runner is None:
            return self._through(apply_model, args)  # LoRAs only: fused in the weights, Forge's own forward
        other = host_compile(owner)
        if other is not None:
            self._warn(f"SD Accel: {other} appeared after SD Accel was applied; this call runs without SD Accel's forward.")
            return self._through(apply_model, args)
        prev = unet.__dict__.get("forward", MISSING)
        unet.forward = runner
        try:
            return self._through(apply_model, args)
        finally:
            if prev is MISSING:
                unet.__dict__.pop("forward", None)
            else:
                unet.__dict__["forward"] = prev

    def _warn(self, message: str):
        if not self.warned:
            self.warned = True
            logger.warning(message)

    def finish(self) -> dict[str, list[dict]]:
        """End the pass: its runs' cache stats by feature ("deepcache")."""
        return {"deepcache": self.runner.finish() if self.runner is not None else []}


__all__ = ["ForgeWrapper", "host_compile"]
