"""ComfyUI host for the LCM-LoRA Sampler: the LCM-LoRA hot-swapped in (lora.py), LCM model
sampling (ComfyUI's ModelSamplingDiscrete "lcm"), ComfyUI's own lcm sampler, and DeepCache off
for runs too short for it to help.
"""
from __future__ import annotations

import collections

from ...lcm import DEEPCACHE_MIN_STEPS, LcmConfig, deepcache_helps
from ...log import logger
from ...lora import read_lora
from .model import check_model, wrappers_mp
from .deepcache import DEEPCACHE_KEY
from .lora import apply_hotswap

LCM_SAMPLER, LCM_SCHEDULER = "lcm", "sgm_uniform"


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
    wmp = wrappers_mp()
    for kind in (wmp.OUTER_SAMPLE, wmp.DIFFUSION_MODEL):
        m.remove_wrappers_with_key(kind, DEEPCACHE_KEY)
    m.model_options["transformer_options"].pop(DEEPCACHE_KEY, None)
    logger.info("SD Accel LCM: DeepCache is off for this %d-step run: each LCM step jumps far along the trajectory, so "
                "reused deep features would be stale (caching helps from %d steps at interval %d).",
                steps, max(DEEPCACHE_MIN_STEPS, 2 * interval), interval)
    return m


class LcmClones:
    """The clones one LCM node samples with, held by the node (its per-node state).

    Built once per (LoRA file contents, strength, DeepCache on/off) over the node's current
    input MODEL, so a re-executed node (new seed, cfg, denoise) samples the same patcher and
    the LoRA it fused stays fused. Only the current input's clones are kept: a new input
    drops the old ones. node -> clones -> clone -> parent (the input) is no cycle, so all of it
    goes by reference counting when the node or its input changes, and ComfyUI's loaded-model
    entry moves from a dying clone to its live parent (`LoadedModel._switch_parent`).
    """

    SIZE = 4

    def __init__(self):
        self._input = None
        self._clones: collections.OrderedDict = collections.OrderedDict()

    def get(self, model, path: str, strength: float, steps: int, unique_id=None):
        if model is not self._input:
            self._clones.clear()
            self._input = model
        interval = _deepcache_interval(model)
        key = (read_lora(path).key, float(strength), interval is not None and deepcache_helps(steps, interval))
        m = self._clones.get(key)
        if m is None:
            m = self._clones[key] = lcm_clone(model, path, strength, steps, unique_id)
            while len(self._clones) > self.SIZE:
                self._clones.popitem(last=False)
        self._clones.move_to_end(key)
        return m


def lcm_clone(model, path: str, strength: float, steps: int, unique_id=None):
    """The clone the LCM node samples with: tracked for the browser, LCM-LoRA hot-swapped, LCM
    model sampling, DeepCache off for runs too short for it."""
    from . import events as comfy_events

    if not hasattr(model, "clone"):
        check_model(model, "LCM-LoRA Sampler")  # raises: not a MODEL
    base = model.clone()
    if unique_id is not None:
        comfy_events.track(base, "lcm", unique_id)
    return _without_deepcache(lcm_model(base, path, strength), steps)


def lcm_sample(model, positive, negative, latent_image, path: str, seed: int, config: LcmConfig, unique_id=None,
               clones: LcmClones | None = None, recommended: bool = True):
    """LCM-LoRA + LCM sampling through ComfyUI's own sampler (KSampler path); returns the LATENT dict.
    DiT models take their few-step LoRA's own settings instead (fewstep.py).

    `clones`: the node's LcmClones, so a re-executed node samples the same clone (None: a new one)."""
    import nodes

    from .fewstep import fewstep_sample, is_dit

    if is_dit(model):
        return fewstep_sample(model, positive, negative, latent_image, path, seed, config, recommended, unique_id)
    if clones is not None:
        m = clones.get(model, path, config.strength, config.steps, unique_id)
    else:
        m = lcm_clone(model, path, config.strength, config.steps, unique_id)
    out = nodes.common_ksampler(m, seed, config.steps, config.cfg, LCM_SAMPLER, LCM_SCHEDULER, positive, negative,
                                latent_image, denoise=config.denoise)
    return out[0]


__all__ = ["LcmClones", "lcm_clone", "lcm_model", "lcm_sample"]
