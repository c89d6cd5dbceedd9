"""ComfyUI host for the LCM-LoRA Sampler on DiT families: the few-step LoRA (Qwen-Image-Lightning,
Wan lightx2v, Hyper-FLUX / FLUX Turbo) hot-swapped in, the flow shift it was distilled with
(ComfyUI's own ModelSamplingSD3 patch, keeping the model's multiplier), and KSampler's path
with the LoRA's sampler, scheduler, steps and CFG. The model's own flow sampling stays: the SD
LCM schedule is never put on a flow model.
"""
from __future__ import annotations

import math

from ...errors import SDAccelError
from ...families import family_of
from ...fewstep import FewStep, recognise
from ...lcm import LcmConfig
from ...log import logger
from .model import check_model
from .lora import apply_hotswap


def is_dit(model) -> bool:
    """Whether the MODEL is of a family the few-step path serves (not an SD UNet: those take the LCM path)."""
    fam = family_of(model.get_model_object("diffusion_model")) if hasattr(model, "get_model_object") else None
    return fam is not None and fam.skip_count is None


def profile(model, path: str) -> FewStep:
    """Which few-step LoRA `path` is, for this MODEL's family (SDAccelError when it is none SD Accel knows)."""
    unet = check_model(model, "LCM-LoRA Sampler")
    if unet is None:
        raise SDAccelError(f"SD Accel LCM-LoRA Sampler: this model ({type(model.get_model_object('diffusion_model')).__name__}) "
                           "cannot take a hot-swapped LoRA here (see the warning above). Use ComfyUI's LoraLoader and KSampler.")
    fam = family_of(unet)
    return recognise(fam.name, fam.display, path)


def _with_shift(model, alpha: float):
    """A clone sampling with flow shift `alpha` (sigma = alpha t / (1 + (alpha - 1) t)), through the ComfyUI
    node for the model's kind of flow sampling: SD3-style (Wan, Z-Image; the model's own multiplier kept) or
    Flux-style (Flux, Qwen-Image in ComfyUI 0.33), whose `shift` is mu = ln(alpha), the same curve."""
    import comfy.model_sampling as ms_mod
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux, ModelSamplingSD3

    ms = model.get_model_object("model_sampling")
    if isinstance(ms, getattr(ms_mod, "ModelSamplingFlux", ())):
        mu = math.log(alpha)
        out = ModelSamplingFlux().patch(model, mu, mu, 1024, 1024)  # max == base: mu whatever the size
    elif isinstance(ms, ms_mod.ModelSamplingDiscreteFlow) and isinstance(ms, ms_mod.CONST):
        out = ModelSamplingSD3().patch(model, alpha, multiplier=ms.multiplier)
    else:
        raise SDAccelError(f"SD Accel LCM-LoRA Sampler: expected a flow-matching model for this few-step LoRA, found "
                           f"{type(ms).__name__} sampling ({', '.join(c.__name__ for c in type(ms).__mro__[1:3])}). Use the "
                           "few-step LoRA with the model it was made for.")
    return out[0] if isinstance(out, tuple) else out.result[0]


def fewstep_clone(model, path: str, strength: float, fs: FewStep):
    """A clone with the few-step LoRA hot-swapped in (at `strength` times the strength it was made for) and its shift."""
    m = apply_hotswap(model, path, fs.strength * strength)
    return _with_shift(m, fs.shift) if fs.shift is not None else m


def fewstep_sample(model, positive, negative, latent_image, path: str, seed: int, config: LcmConfig,
                   recommended: bool = True, unique_id=None):
    """Sample with a DiT few-step LoRA; with `recommended`, its own steps and CFG (else config's)."""
    import nodes

    from . import events as comfy_events

    fs = profile(model, path)
    steps, cfg = (fs.steps, fs.cfg) if recommended else (config.steps, config.cfg)
    m = fewstep_clone(model, path, config.strength, fs)
    if unique_id is not None:
        comfy_events.track(m, "lcm", unique_id, source=model)
    if fs.note:
        logger.warning("SD Accel LCM-LoRA Sampler: %s", fs.note)
    logger.info("SD Accel LCM-LoRA Sampler: %s: %d steps, CFG %g, %s / %s%s, LoRA strength %g.", fs.name, steps, cfg, fs.sampler,
                fs.scheduler, f", shift {fs.shift:g}" if fs.shift is not None else "", fs.strength * config.strength)
    out = nodes.common_ksampler(m, seed, steps, cfg, fs.sampler, fs.scheduler, positive, negative, latent_image,
                                denoise=config.denoise)
    return out[0]


__all__ = ["fewstep_sample", "fewstep_clone", "profile", "is_dit"]
