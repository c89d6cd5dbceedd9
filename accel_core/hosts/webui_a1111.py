"""AUTOMATIC1111 installer: SD Accel's runner as the UNet's instance `forward` for one generation.

The UNet is `sd_model.model.diffusion_model` (the ldm/sgm `UNetModel`), called through
`nn.Module.__call__` by the webui's wrappers. The instance `forward` comes off again in
`postprocess`, at the start of the next generation and on model load, so a switched-off
option leaves the webui's own code path untouched. `modules.sd_unet` (TensorRT's mechanism)
is not used: it is a process-wide setting that moves the real UNet to the CPU, which suits a
separate engine, not options that change per generation; while an SD Unet is active we step
aside and say so. `modules.*` is imported inside functions only.
"""
from __future__ import annotations

import weakref

from torch import nn

from ..compile import CompiledUNet
from ..log import logger
from ..families import family_of
from .webui_cache import _weights_token
from .webui_lora import fuse_loras, lora_specs, restore_loras, webui_lora_active
from .webui_options import WebuiOptions
from .webui_quant import A1111_HINT, check_quantized
from .webui_runner import MISSING, Runner, build_runner
from .webui_status import Applied, feature_module, record, unavailable_notes


def a1111_unet(sd_model) -> nn.Module | None:
    model = getattr(sd_model, "model", None)
    unet = getattr(model, "diffusion_model", None)
    fam = family_of(unet)
    return unet if fam is not None and fam.host_walk is not None else None  # the webui runs the host walk (DeepCache)


class A1111Patch:
    """The one scoped forward swap SD Accel has on the A1111 UNet at a time (apply / undo)."""

    def __init__(self):
        self.unet_ref: weakref.ref | None = None
        self.prev = MISSING
        self.runner: Runner | None = None
        self.compiled: CompiledUNet | None = None
        self.key = None
        self.last_deepcache: list[dict] = []

    @property
    def active(self) -> bool:
        return self.runner is not None and self.unet_ref is not None and self.unet_ref() is not None

    def apply(self, sd_model, opts: WebuiOptions, *, lora_dirs=None, progress=None) -> Applied | None:
        """Route `sd_model`'s UNet through SD Accel for the coming sampling (idempotent per options).

        `progress()` -> (step, total) of the sampler's denoiser, for DeepCache; `lora_dirs`: the
        webui's LoRA folder(s).
        """
        if not opts.active:
            self.undo()
            return record(None)
        applied = Applied("A1111", opts, unavailable_notes(opts))
        unet = a1111_unet(sd_model)
        if unet is None:
            self.undo()
            applied.notes.append("not applied: the loaded model is not an SD1.x/SD2.x/SDXL UNet")
            return record(applied)
        active_sd_unet = _active_sd_unet()
        if active_sd_unet:
            self.undo()
            applied.notes.append(f"not applied: the SD Unet {active_sd_unet!r} is active (Settings > SD Unet)")
            return record(applied)
        if "forward" in unet.__dict__ and not (self.runner is not None and unet.__dict__["forward"] is self.runner):
            # Another extension (ControlNet, ...) routes the UNet through its own forward for this
            # generation; going around it would silently drop what it adds.
            self.undo()
            applied.notes.append("not applied: another extension replaced the UNet's forward for this generation (e.g. ControlNet)")
            return record(applied)
        key = (id(unet), opts, _weights_token(unet) if opts.cast_on else None)
        if self.active and self.unet_ref() is unet and self.key == key:
            applied.compile_report = self.compiled.report if self.compiled is not None else None
            return record(applied)
        if not opts.cast_on:
            check_quantized(unet, opts, A1111_HINT)  # with a cast, compile and LoRAs run on a float copy
        self.undo()
        device_type = next(unet.parameters()).device.type
        needs_runner = opts.compile_on or opts.cast_on or opts.attention_on or (opts.deepcache_on and feature_module("deepcache") is not None)
        runner, compiled, target = build_runner(unet, opts, device_type, progress) if needs_runner else (None, None, unet)
        applied.compile_report = compiled.report if compiled is not None else None
        self._apply_loras(target, opts, lora_dirs, applied)
        if runner is not None:
            self.prev = unet.__dict__.get("forward", MISSING)
            unet.forward = runner  # a plain callable: nn.Module.__setattr__ keeps it in __dict__
            self.unet_ref, self.runner, self.compiled, self.key = weakref.ref(unet), runner, compiled, key
        return record(applied)

    @staticmethod
    def _apply_loras(target, opts, lora_dirs, applied):
        if not (opts.loras_on or opts.lcm_on) or feature_module("lora") is None:
            return
        if webui_lora_active(target):
            applied.notes.append("LoRA hot-swap not applied: the prompt's <lora:...> networks are active on the same weights; use one or the other")
            return
        applied.lora = fuse_loras(target, lora_specs(opts, lora_dirs))

    def undo(self) -> bool:
        """Take SD Accel's forward off the UNet and its LoRAs out of the weights. True when a forward was removed."""
        restore_loras()
        unet = self.unet_ref() if self.unet_ref is not None else None
        runner, prev = self.runner, self.prev
        self.unet_ref, self.runner, self.prev, self.compiled, self.key = None, None, MISSING, None, None
        if runner is not None:
            self.last_deepcache = runner.finish()
        if unet is None or runner is None:
            return False
        if unet.__dict__.get("forward") is not runner:
            logger.warning("SD Accel: the UNet's forward was replaced by something else after SD Accel; leaving it as it is.")
            return False
        if prev is MISSING:
            del unet.__dict__["forward"]
        else:
            unet.__dict__["forward"] = prev
        return True


def _active_sd_unet() -> str | None:
    try:
        from modules import sd_unet
    except ImportError:
        return None
    cur = getattr(sd_unet, "current_unet", None)
    if cur is None:
        return None
    return getattr(getattr(cur, "option", None), "label", None) or type(cur).__name__


A1111 = A1111Patch()


__all__ = ["a1111_unet", "A1111Patch", "A1111"]
