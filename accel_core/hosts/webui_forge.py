"""Forge installer: a `model_function_wrapper` (chained to any earlier one) on a clone of Forge's UNet patcher, per pass.

`process_before_every_sampling` hands us `p.sd_model.forge_objects.unet`; Forge resets it from
`forge_objects_after_applying_lora` before every pass (hires fix is a second one), so the
clone lives for that pass only. The wrapper routes the diffusion model's forward through
SD Accel's runner for the call only. `backend.*` is imported inside functions only.
"""
from __future__ import annotations

import weakref
from dataclasses import replace

from ..errors import SDAccelError
from ..registry import compiled_for
from ..unet import LDM, unet_kind
from .webui_lora import fuse_loras, lora_specs
from .webui_options import OFF, WebuiOptions
from .webui_runner import MISSING, Runner, build_runner
from .webui_status import Applied, feature_module, record, unavailable_notes


class _ForgeWrapper:
    """Forge `model_function_wrapper`: routes the diffusion model's forward through SD Accel for one call.

    One per sampling pass (Forge rebuilds its UNet patcher before each). Forge deep-copies
    `model_options` on every clone; the copy is this same object (its state is this pass's).
    """

    def __init__(self, opts: WebuiOptions, previous=None, *, specs=None, progress=None):
        self.opts, self.previous, self.progress = opts, previous, progress
        self.specs = list(specs) if specs is not None else None
        self.runner: Runner | None = None
        self.unet_ref = None

    def __deepcopy__(self, memo):
        return self

    def _runner_for(self, unet, device_type):
        if self.runner is None or self.unet_ref() is not unet:
            if self.specs is not None:
                # Fused now, after Forge has loaded the UNet and applied its own LoRAs for this pass.
                fuse_loras(unet, self.specs)
            self.runner, _, _ = build_runner(unet, self.opts, device_type, self.progress)
            self.unet_ref = weakref.ref(unet)
        return self.runner

    def __call__(self, apply_model, args: dict):
        unet = apply_model.__self__.diffusion_model
        runner = self._runner_for(unet, args["input"].device.type)
        prev = unet.__dict__.get("forward", MISSING)
        unet.forward = runner
        try:
            if self.previous is not None:
                return self.previous(apply_model, args)
            return apply_model(args["input"], args["timestep"], **args["c"])
        finally:
            if prev is MISSING:
                unet.__dict__.pop("forward", None)
            else:
                unet.__dict__["forward"] = prev

    def finish(self) -> list[dict]:
        return self.runner.finish() if self.runner is not None else []


def apply_forge(unet_patcher, opts: WebuiOptions, *, lora_dir: str | None = None, progress=None):
    """A clone of Forge's UNet patcher with SD Accel applied, and what was applied. The input is never modified."""
    if not opts.active:
        return unet_patcher, record(None)
    applied = Applied("Forge", opts, unavailable_notes(opts))
    if not hasattr(unet_patcher, "clone") or not hasattr(unet_patcher, "model_options"):
        raise SDAccelError(f"SD Accel: expected Forge's UNet patcher (p.sd_model.forge_objects.unet), found {type(unet_patcher).__name__}.")
    unet = getattr(getattr(unet_patcher, "model", None), "diffusion_model", None)
    if unet_kind(unet) != LDM:
        applied.notes.append(f"not applied: {type(unet).__name__} is not an SD1.x/SD2.x/SDXL UNet (Flux and SD3 run unchanged)")
        return unet_patcher, record(applied)
    if opts.cast_on:
        # Forge owns the UNet's storage dtype and moves it between devices itself; a second
        # cast copy would sit outside its memory management. Its own selector does this job.
        applied.notes.append("cast not applied on Forge: choose the UNet dtype with Forge's 'Diffusion in Low Bits' selector")
        opts = replace(opts, dtype=OFF, channels_last=False)
    specs = None
    if (opts.loras_on or opts.lcm_on) and feature_module("lora") is not None:
        specs = lora_specs(opts, lora_dir)  # names checked now: an unknown one fails before sampling
    if opts.deepcache_on and feature_module("deepcache") is not None:
        from ..deepcache import check_depth

        check_depth(unet, opts.deepcache_config())
    m = unet_patcher.clone()
    wrapper = _ForgeWrapper(opts, m.model_options.get("model_function_wrapper"), specs=specs, progress=progress)
    m.set_model_unet_function_wrapper(wrapper)
    if opts.compile_on:
        applied.compile_report = compiled_for(unet, opts.compile_config()).report
    forge_passes.append(wrapper)
    return m, record(applied)


# This generation's Forge wrappers (one per sampling pass: hires fix makes two); they hold
# their pass's runner, and through it the UNet, until the generation ends.
forge_passes: list[_ForgeWrapper] = []


__all__ = ["apply_forge", "forge_passes"]
