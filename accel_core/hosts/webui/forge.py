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

The model's family comes from the core's registry (accel_core/families). On a DiT model (Forge
Neo's Flux, Chroma, Qwen-Image, Wan, Z-Image) forge_dit says what runs and how; the cache
controls run the Step Cache there (stepcache.py) instead of DeepCache.
"""
from __future__ import annotations

from dataclasses import replace

from ...deepcaching import check_depth
from ...errors import SDAccelError
from ...families import family_of, known_names
from ...registry import compiled_for, regional_for
from .forge_dit import DitWrapper, dit_options, regional, takes_unet_features
from .forge_wrapper import ForgeWrapper, host_compile
from .lora import FusedLoras, lora_specs
from .options import OFF, WebuiOptions
from .quant import FORGE_HINT, check_quantized
from .status import Applied, feature_module, unavailable_notes


def apply_forge(unet_patcher, opts: WebuiOptions, *, loras: FusedLoras, lora_dirs=None, progress=None):
    """(a clone of Forge's UNet patcher with SD Accel applied, what was applied, this pass's wrapper or None). The input is never modified.

    `loras`: the session's record of fused LoRAs; `lora_dirs`: the webui's LoRA folder(s)
    (`--lora-dir`, and Neo's `--lora-dirs`). The wrapper holds the pass's runner until the
    session finishes the generation.
    """
    if not opts.active:
        return unet_patcher, None, None
    applied = Applied("Forge", opts, unavailable_notes(opts))
    if not hasattr(unet_patcher, "clone") or not hasattr(unet_patcher, "model_options"):
        raise SDAccelError(f"SD Accel: expected Forge's UNet patcher (p.sd_model.forge_objects.unet), found {type(unet_patcher).__name__}.")
    kmodel = getattr(unet_patcher, "model", None)
    unet = getattr(kmodel, "diffusion_model", None)
    fam = family_of(unet)
    if fam is None:
        applied.notes.append(f"not applied: {type(unet).__name__} is not a model SD Accel knows (it knows {known_names()}); it runs unchanged")
        return unet_patcher, applied, None
    applied.dit = not takes_unet_features(fam)
    steps = None  # on a DiT: this pass's Step Cache (the cache controls' interval goes to it)
    if applied.dit:
        opts, steps = dit_options(fam, unet, opts, applied.notes)
    if opts.cast_on:
        # Forge owns the UNet's storage dtype and moves it between devices itself; a second
        # cast copy would sit outside its memory management. Its own selector does this job.
        applied.notes.append("cast not applied on Forge: choose the UNet dtype with Forge's 'Diffusion in Low Bits' selector")
        opts = replace(opts, dtype=OFF, channels_last=False)
    other = host_compile(kmodel)
    if other is not None:
        asked = [label for label, on in (("compile", opts.compile_on), ("DeepCache", opts.deepcache_on), ("Step Cache", steps is not None),
                                         ("attention kernel", opts.attention_on)) if on]
        if asked:
            applied.notes.append(f"{' and '.join(asked)} not applied: {other} compiles the UNet for this generation, and SD Accel steps aside "
                                 "(set its preset to Disable to use SD Accel's)")
            opts, steps = replace(opts, backend=OFF, deepcache_interval=1, attention="auto"), None
    check_quantized(unet, opts, FORGE_HINT, "UNet" if takes_unet_features(fam) else f"{fam.display} model")
    specs = None
    if (opts.loras_on or opts.lcm_on) and feature_module("lora") is not None:
        specs = lora_specs(opts, lora_dirs)  # names checked now: an unknown one fails before sampling
    plan = opts.plan()  # the core's configs, built once here and handed down
    if plan.deepcache is not None:
        check_depth(unet, plan.deepcache)
    swap = plan.compile is not None or plan.attention != "auto" or plan.deepcache is not None or steps is not None
    if not swap and specs is None:
        return unet_patcher, applied, None  # nothing left to apply (e.g. stepped aside for Neo's compile)
    m = unet_patcher.clone()
    previous = m.model_options.get("model_function_wrapper")
    if not takes_unet_features(fam) and regional(fam, unet):  # DiT blocks through the regional compile
        wrapper = DitWrapper(plan, previous, family=fam, steps=steps, kmodel=kmodel, specs=specs, loras=loras)
        report = regional_for(unet, fam, plan.compile).report if plan.compile is not None else None
    else:
        wrapper = ForgeWrapper(plan, previous, kmodel=kmodel, specs=specs, loras=loras, progress=progress, swap=swap)
        report = compiled_for(unet, plan.compile).report if plan.compile is not None else None
    m.set_model_unet_function_wrapper(wrapper)
    applied.compile_report = report
    return m, applied, wrapper


__all__ = ["apply_forge", "host_compile"]
