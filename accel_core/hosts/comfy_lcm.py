"""ComfyUI host for the LCM-LoRA Sampler: the LCM-LoRA hot-swapped in (comfy_lora), LCM model
sampling (ComfyUI's ModelSamplingDiscrete "lcm"), ComfyUI's own lcm sampler, and DeepCache off
for runs too short for it to help.
"""
from __future__ import annotations

import collections

from ..lcm import DEEPCACHE_MIN_STEPS, LcmConfig, deepcache_helps
from ..log import logger
from ..lora import read_lora
from .comfy import _check_model, _wrappers_mp
from .comfy_deepcache import DEEPCACHE_KEY
from .comfy_lora import apply_hotswap

LCM_SAMPLER, LCM_SCHEDULER = "lcm", "sgm_uniform"
_LCM_CACHE_ATTR = "_sd_accel_lcm_clones"  # on an LCM node's input MODEL: the clones built from it
_LCM_CACHE_SIZE = 4

def lcm_model(model, path: str, strength: float):
    """Clone with the LCM-LoRA hot-swapped in and LCM model sampling (ModelSamplingDiscrete "lcm")."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    m = apply_hotswap(model, path, strength)
    patched = ModelSamplingDiscrete().patch(m, "lcm", False)
    return patched[0] if isinstance(patched, tuple) else patched.result[0]


def _deepcache_interval(model) -> int | None:
    state = model.model_options.get("transformer_options", {}).get(DEEPCACHE_KEY)
    return None if state is None else getattr(getattr(state, "config", None), "cache_interval", 1)


def _without_deepcache(model, steps: int):
    """A clone with DeepCache switched off when the run is too short for it to help (one log line)."""
    interval = _deepcache_interval(model)
    if interval is None or deepcache_helps(steps, interval):
        return model
    m = model.clone()
    wmp = _wrappers_mp()
    for kind in (wmp.OUTER_SAMPLE, wmp.DIFFUSION_MODEL):
        m.remove_wrappers_with_key(kind, DEEPCACHE_KEY)
    m.model_options["transformer_options"].pop(DEEPCACHE_KEY, None)
    logger.info("SD Accel LCM: DeepCache is off for this %d-step run: each LCM step jumps far along the trajectory, so "
                "reused deep features would be stale (caching helps from %d steps at interval %d).",
                steps, max(DEEPCACHE_MIN_STEPS, 2 * interval), interval)
    return m


def lcm_clone(model, path: str, strength: float, steps: int, unique_id=None):
    """The clone the LCM node samples with: tracked for the browser, LCM-LoRA hot-swapped, LCM
    model sampling, DeepCache off for runs too short for it.

    Built once per (input MODEL, LoRA file contents, strength, DeepCache on/off, node) and kept
    on the input MODEL, so a re-executed node (new seed, cfg, denoise) samples the same patcher
    and the LoRA it fused stays fused. The cache lives and dies with the input: its clones are
    rooted at the input's parent, not at the input, so input -> cache -> clone is no cycle and
    goes by reference counting. (Freed by the cycle collector instead, the loaded clone and its
    parents die together: `LoadedModel._switch_parent` then finds no parent to switch to, and
    ComfyUI reports a memory leak and collects garbage at every later load of that checkpoint.)
    """
    from . import comfy_events

    if not hasattr(model, "clone") or not hasattr(model, "__dict__"):
        _check_model(model, "LCM-LoRA Sampler")  # raises: not a MODEL
    interval = _deepcache_interval(model)
    key = (read_lora(path).key, float(strength), interval is not None and deepcache_helps(steps, interval), unique_id)
    cache = model.__dict__.get(_LCM_CACHE_ATTR)
    if cache is None:
        cache = model.__dict__[_LCM_CACHE_ATTR] = collections.OrderedDict()
    m = cache.get(key)
    if m is not None:
        cache.move_to_end(key)
        return m
    base = model.clone()
    base.parent = model.parent  # see above; ComfyUI reads `parent` only to pick the loaded patcher when a clone dies
    if unique_id is not None:
        comfy_events.track(base, "lcm", unique_id)
    m = _without_deepcache(lcm_model(base, path, strength), steps)
    cache[key] = m
    while len(cache) > _LCM_CACHE_SIZE:
        cache.popitem(last=False)
    return m


def lcm_sample(model, positive, negative, latent_image, path: str, seed: int, config: LcmConfig, unique_id=None,
               recommended: bool = True):
    """LCM-LoRA + LCM sampling through ComfyUI's own sampler (KSampler path); returns the LATENT dict.
    DiT models take their few-step LoRA's own settings instead (comfy_fewstep)."""
    import nodes

    from .comfy_fewstep import fewstep_sample, is_dit

    if is_dit(model):
        return fewstep_sample(model, positive, negative, latent_image, path, seed, config, recommended, unique_id)

    m = lcm_clone(model, path, config.strength, config.steps, unique_id)
    out = nodes.common_ksampler(m, seed, config.steps, config.cfg, LCM_SAMPLER, LCM_SCHEDULER, positive, negative,
                                latent_image, denoise=config.denoise)
    return out[0]




__all__ = ["lcm_clone", "lcm_model", "lcm_sample"]
