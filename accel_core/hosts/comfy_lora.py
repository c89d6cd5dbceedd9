"""ComfyUI host for LoRA hot-swap and the LCM-LoRA sampler.

Why not ComfyUI's own weight patches: `add_patches` gives the clone a new `patches_uuid`, so
the next load unpatches, moves the UNet to the offload device and back, and repatches
(comfyui-api.md §2.6); a compiled UNet may then also recompile. Hot-swap instead fuses the
deltas in place with `accel_core.lora`, keeping tensor identity.

Every clone of a MODEL shares one UNet, so *when* the deltas are in the weights is what keeps
clones apart. Like ComfyUI's own LoRA patches, they stay in while the patcher that asked for
them stays loaded:
- the node clones the model and records the LoRA set it wants as an attachment (an
  immutable `HotSwapSet`, shared by later clones; a chained node appends to it);
- ON_PRE_RUN (fired by `CFGGuider.outer_sample` after ComfyUI has loaded and patched the
  weights for this run) brings the UNet to exactly that set and makes the sampling clone the
  set's owner (`LoraState.owner`). `apply_loras` diffs against what is fused, so the next run
  of the same clone (new seed, cfg, ...) writes no weight;
- the owner is released (exact original bits back) when it stops being the loaded patcher:
  at ON_DETACH (`load_models_gpu` detaches every loaded clone of the model before loading
  another; model unloads detach too), or when it is garbage-collected while loaded
  (`LoadedModel._switch_parent` then makes its parent the loaded patcher; `ModelPatcher.__del__`
  detaches, and a `weakref.finalize` covers patchers that do not). `load_models_gpu` also
  detaches a patcher to reload *itself*: an OUTER_SAMPLE wrapper marks the patcher being
  sampled, and a detach for it (or for a clone that wants the same set over the same ComfyUI
  patches, which then becomes the owner) keeps the deltas.
So another clone always loads onto restored weights, and ComfyUI, which backs weights up only
while loading a patcher, never backs up our deltas (LoraLoader before or after hot-swap). One
case keeps the per-run cycle: where ComfyUI's own patches touch a layer we fuse, ComfyUI writes
its backups over that layer without a callback first (an unload unpatches before ON_DETACH
fires, a lowvram partial unload restores single layers), so such runs restore at ON_CLEANUP.
Module-level callbacks (never per-clone closures) keep what dynamo may guard on identical
across clones: swapping never recompiles.
"""
from __future__ import annotations

import collections
import contextvars
import math
import weakref
from dataclasses import dataclass

import torch

from .. import events
from ..errors import SDAccelError
from ..lcm import DEEPCACHE_MIN_STEPS, LcmConfig, deepcache_helps
from ..log import logger
from ..lora import LoraConfig, LoraSpec, apply_loras, lora_state, read_lora
from .comfy import _check_model, patchable_clone

LORA_KEY = "sd_accel.lora"
DEEPCACHE_KEY = "sd_accel.deepcache"
LCM_SAMPLER, LCM_SCHEDULER = "lcm", "sgm_uniform"
_OWNER_ATTR = "_sd_accel_lora_owner"  # on a patcher that fused a set: its _Owner
_LCM_CACHE_ATTR = "_sd_accel_lcm_clones"  # on an LCM node's input MODEL: the clones built from it
_LCM_CACHE_SIZE = 4

# unet -> the set the previous run used: the log says "swapped" only when it changes.
_last_run: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
# The patcher whose OUTER_SAMPLE (model load, pre-run, sampling) is running in this context.
_sampling: contextvars.ContextVar = contextvars.ContextVar("sd_accel_lora_sampling", default=None)


@dataclass(frozen=True)
class HotSwapSet:
    """The LoRAs a clone wants fused while it samples (immutable: clones share it)."""

    specs: tuple[LoraSpec, ...]
    config: LoraConfig = LoraConfig()

    def plus(self, spec: LoraSpec) -> "HotSwapSet":
        return HotSwapSet(self.specs + (spec,), self.config)


class _Owner:
    """Stands for one patcher in `LoraState.owner` without keeping it alive.

    lazy: the deltas may stay fused after a run (False: ComfyUI patches the same layers, or the
    pre-run did not finish; then ON_CLEANUP restores).
    """

    __slots__ = ("unet", "lazy")

    def __init__(self, unet):
        self.unet = weakref.ref(unet)
        self.lazy = False


def _owner(patcher, unet) -> _Owner:
    own = patcher.__dict__.get(_OWNER_ATTR)  # clone() builds a new object: never inherited
    if own is None:
        own = patcher.__dict__[_OWNER_ATTR] = _Owner(unet)
        weakref.finalize(patcher, _release, own).atexit = False
    return own


def _release(own: _Owner | None):
    """Restore the original weights if `own`'s patcher still owns what is fused."""
    unet = own.unet() if own is not None else None
    if unet is None:
        return
    state = lora_state(unet)
    with state.lock:
        if state.owner is not own:
            return
        state.owner = None
        if state.active:
            report = apply_loras(unet, [])
            logger.debug("SD Accel LoRA Hot-Swap: released: %s", report.summary())


def _callbacks_mp():
    import comfy.patcher_extension as pe

    return pe.CallbacksMP


def _overlaps_comfy_patches(patcher, state) -> bool:
    """Whether ComfyUI weight patches (LoraLoader) of `patcher` touch a weight we fused."""
    if not patcher.patches and not patcher.backup:
        return False
    comfy_keys = patcher.patches.keys() | patcher.backup.keys()
    return any(f"diffusion_model.{k}" in comfy_keys for k in state.signature)


def _on_pre_run(patcher):
    wanted = hotswap_set(patcher)
    if wanted is None:
        return
    unet = patcher.model.diffusion_model
    state = lora_state(unet)
    own = _owner(patcher, unet)
    with state.lock:
        if state.owner is not own:
            own.lazy = False  # until the set is in: a failed fuse is undone at cleanup
            state.owner = own
        report = apply_loras(unet, list(wanted.specs), wanted.config)
        own.lazy = not _overlaps_comfy_patches(patcher, state)
    key = tuple(wanted.specs)
    if _last_run.get(unet) != key:
        _last_run[unet] = key
        logger.info("SD Accel LoRA Hot-Swap: %s (no reload, no recompile).", report.summary())
        events.emit("lora_swap", loras=[{"name": n, "strength": s, "layers": k} for n, s, k in report.applied],
                    layers_changed=report.layers_changed, seconds=report.seconds)
    else:
        logger.debug("SD Accel LoRA Hot-Swap: %s", report.summary())


def _on_cleanup(patcher):
    own = patcher.__dict__.get(_OWNER_ATTR)
    if own is not None and not own.lazy:
        _release(own)


def _keeps_fused(patcher, own: _Owner) -> bool:
    """At a detach inside `load_models_gpu`: is the patcher about to be loaded one the fused set is right for?"""
    nxt = _sampling.get()
    if nxt is patcher:
        return True  # reloaded for its own run
    if nxt is None or not own.lazy or nxt.patches_uuid != patcher.patches_uuid or hotswap_set(nxt) != hotswap_set(patcher):
        return False
    # Same set over the same ComfyUI patches (one hot-swap MODEL behind two samplers, one of
    # them through a ModelSamplingDiscrete node): nothing to restore; the next patcher takes over.
    nown = _owner(nxt, own.unet())
    nown.lazy = True
    lora_state(own.unet()).owner = nown
    return True


def _on_detach(patcher, unpatch_all=True):
    own = patcher.__dict__.get(_OWNER_ATTR)
    if own is None or own.unet() is None:
        return
    state = lora_state(own.unet())
    with state.lock:
        if state.owner is not own or (not unpatch_all and _keeps_fused(patcher, own)):
            return
    _release(own)


def _outer_sample(executor, *args, **kwargs):
    # OUTER_SAMPLE runs around the model load: a detach during it can tell a reload of the
    # patcher being sampled from a switch to another clone.
    token = _sampling.set(getattr(executor.class_obj, "model_patcher", None))
    try:
        return executor(*args, **kwargs)
    finally:
        _sampling.reset(token)


def hotswap_set(model) -> HotSwapSet | None:
    s = model.get_attachment(LORA_KEY) if hasattr(model, "get_attachment") else None
    return s if isinstance(s, HotSwapSet) else None


def apply_hotswap(model, path: str, strength: float, config: LoraConfig | None = None):
    """Clone `model` and add the LoRA at `path` to the set the clone samples with.

    The file is read and matched against the UNet now, so a wrong file fails at the node
    with the model untouched; the weights change only when the clone samples.
    """
    unet = _check_model(model, "LoRA Hot-Swap")
    if unet is None:
        return model
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise SDAccelError(f"SD Accel LoRA Hot-Swap: strength must be a finite number, found {strength!r}. Use e.g. 1.0.")
    prev = hotswap_set(model)
    config = config or (prev.config if prev else LoraConfig())
    lf = read_lora(path)
    if strength == 0:
        return model  # like LoraLoader: strength 0 is the input model
    m = patchable_clone(model, "LoRA Hot-Swap")  # fused deltas need weights we may write (DynamicVRAM: a regular copy)
    if m is None:
        return model
    lora_state(m.model.diffusion_model).resolve(lf, config)  # raises SDAccelError (how many layers matched) for another architecture
    wanted = (prev or HotSwapSet((), config)).plus(LoraSpec(str(path), float(strength)))
    m.set_attachments(LORA_KEY, wanted)
    cmp = _callbacks_mp()
    for kind, fn in ((cmp.ON_PRE_RUN, _on_pre_run), (cmp.ON_CLEANUP, _on_cleanup), (cmp.ON_DETACH, _on_detach)):
        m.remove_callbacks_with_key(kind, LORA_KEY)
        m.add_callback_with_key(kind, LORA_KEY, fn)
    from .comfy import _wrappers_mp

    outer = _wrappers_mp().OUTER_SAMPLE
    m.remove_wrappers_with_key(outer, LORA_KEY)
    m.add_wrapper_with_key(outer, LORA_KEY, _outer_sample)
    return m


# --- LCM ----------------------------------------------------------------------------------------------

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
    from .comfy import _wrappers_mp

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


def lcm_sample(model, positive, negative, latent_image, path: str, seed: int, config: LcmConfig, unique_id=None):
    """LCM-LoRA + LCM sampling through ComfyUI's own sampler (KSampler path); returns the LATENT dict."""
    import nodes

    m = lcm_clone(model, path, config.strength, config.steps, unique_id)
    out = nodes.common_ksampler(m, seed, config.steps, config.cfg, LCM_SAMPLER, LCM_SCHEDULER, positive, negative,
                                latent_image, denoise=config.denoise)
    return out[0]


__all__ = ["apply_hotswap", "hotswap_set", "HotSwapSet", "lcm_clone", "lcm_model", "lcm_sample", "LORA_KEY"]
