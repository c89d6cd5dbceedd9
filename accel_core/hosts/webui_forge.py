"""Forge and Forge Neo installer: a `model_function_wrapper` (chained to any earlier one) on a clone of the UNet patcher, per pass.

`process_before_every_sampling` hands us `p.sd_model.forge_objects.unet`; Forge resets it from
`forge_objects_after_applying_lora` before every pass (hires fix is a second one), so the
clone lives for that pass only. The wrapper routes the diffusion model's forward through
SD Accel's runner for the call only. `backend.*` is imported inside functions only.

Another script may wrap the model's `apply_model` itself: Forge Neo's "Torch Compile
Integrated" replaces it with a plain function that runs a torch.compile'd diffusion model (in
`process_batch`, so before us). SD Accel's forward would then run inside that compiled region,
so compile, DeepCache and the attention kernel step aside with a note; LoRAs are fused into
the weights outside it and still apply.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import replace

from torch import nn

from ..errors import SDAccelError
from ..registry import compiled_for
from ..families import family_of
from ..log import logger
from .webui_lora import fuse_loras, lora_specs
from .webui_options import OFF, WebuiOptions
from .webui_quant import FORGE_HINT, check_quantized
from .webui_runner import MISSING, Runner, build_runner
from .webui_status import Applied, feature_module, record, unavailable_notes


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


class _ForgeWrapper:
    """Forge `model_function_wrapper`: routes the diffusion model's forward through SD Accel for one call.

    One per sampling pass (Forge rebuilds its UNet patcher before each). Forge deep-copies
    `model_options` on every clone; the copy is this same object (its state is this pass's).
    It never raises on its own account inside the sampler: when it cannot find the UNet, or
    another wrapper of `apply_model` appears, the call runs as Forge would make it.
    """

    def __init__(self, opts: WebuiOptions, previous=None, *, kmodel=None, specs=None, progress=None, swap=True):
        self.opts, self.previous, self.progress, self.swap = opts, previous, progress, swap
        self.specs = list(specs) if specs is not None else None
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
                fuse_loras(unet, self.specs)
            self.runner = build_runner(unet, self.opts, device_type, self.progress)[0] if self.swap else None
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

    def finish(self) -> list[dict]:
        return self.runner.finish() if self.runner is not None else []


def apply_forge(unet_patcher, opts: WebuiOptions, *, lora_dirs=None, progress=None):
    """A clone of Forge's UNet patcher with SD Accel applied, and what was applied. The input is never modified.

    `lora_dirs`: the webui's LoRA folder(s) (`--lora-dir`, and Neo's `--lora-dirs`).
    """
    if not opts.active:
        return unet_patcher, record(None)
    applied = Applied("Forge", opts, unavailable_notes(opts))
    if not hasattr(unet_patcher, "clone") or not hasattr(unet_patcher, "model_options"):
        raise SDAccelError(f"SD Accel: expected Forge's UNet patcher (p.sd_model.forge_objects.unet), found {type(unet_patcher).__name__}.")
    kmodel = getattr(unet_patcher, "model", None)
    unet = getattr(kmodel, "diffusion_model", None)
    fam = family_of(unet)
    if fam is None or fam.host_walk is None:  # the webui runner cuts the model with the host walk
        applied.notes.append(f"not applied: {type(unet).__name__} is not an SD1.x/SD2.x/SDXL UNet (Flux and SD3 run unchanged)")
        return unet_patcher, record(applied)
    if opts.cast_on:
        # Forge owns the UNet's storage dtype and moves it between devices itself; a second
        # cast copy would sit outside its memory management. Its own selector does this job.
        applied.notes.append("cast not applied on Forge: choose the UNet dtype with Forge's 'Diffusion in Low Bits' selector")
        opts = replace(opts, dtype=OFF, channels_last=False)
    other = host_compile(kmodel)
    if other is not None:
        asked = [label for label, on in (("compile", opts.compile_on), ("DeepCache", opts.deepcache_on), ("attention kernel", opts.attention_on)) if on]
        if asked:
            applied.notes.append(f"{' and '.join(asked)} not applied: {other} compiles the UNet for this generation, and SD Accel steps aside "
                                 "(set its preset to Disable to use SD Accel's)")
            opts = replace(opts, backend=OFF, deepcache_interval=1, attention="auto")
    check_quantized(unet, opts, FORGE_HINT)
    specs = None
    if (opts.loras_on or opts.lcm_on) and feature_module("lora") is not None:
        specs = lora_specs(opts, lora_dirs)  # names checked now: an unknown one fails before sampling
    deepcache = opts.deepcache_on and feature_module("deepcache") is not None
    if deepcache:
        from ..deepcache import check_depth

        check_depth(unet, opts.deepcache_config())
    swap = opts.compile_on or opts.attention_on or deepcache
    if not swap and specs is None:
        return unet_patcher, record(applied)  # nothing left to apply (e.g. stepped aside for Neo's compile)
    m = unet_patcher.clone()
    wrapper = _ForgeWrapper(opts, m.model_options.get("model_function_wrapper"), kmodel=kmodel, specs=specs, progress=progress, swap=swap)
    m.set_model_unet_function_wrapper(wrapper)
    if opts.compile_on:
        applied.compile_report = compiled_for(unet, opts.compile_config()).report
    forge_passes.append(wrapper)
    return m, record(applied)


# This generation's Forge wrappers (one per sampling pass: hires fix makes two); they hold
# their pass's runner, and through it the UNet, until the generation ends.
forge_passes: list[_ForgeWrapper] = []


__all__ = ["apply_forge", "forge_passes", "host_compile"]
