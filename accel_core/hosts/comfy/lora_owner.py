"""Who owns the LoRA set LoRA Hot-Swap fused into a ComfyUI UNet, and when it is restored:
the callbacks and the OUTER_SAMPLE wrapper `lora.apply_hotswap` installs (the set and its owner: lora_set.py).

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

import contextvars

from ... import events
from ...log import logger
from ...lora import apply_loras, lora_state
from .lora_set import LORA_KEY, OWNER_ATTR, HotSwapSet, Owner, hotswap_set, owner_of, release  # noqa: F401  (re-exported)


# The patcher whose OUTER_SAMPLE (model load, pre-run, sampling) is running in this context.
_sampling: contextvars.ContextVar = contextvars.ContextVar("sd_accel_lora_sampling", default=None)


def _overlaps_comfy_patches(patcher, state) -> bool:
    """Whether ComfyUI weight patches (LoraLoader) of `patcher` touch a weight we fused."""
    if not patcher.patches and not patcher.backup:
        return False
    comfy_keys = patcher.patches.keys() | patcher.backup.keys()
    return any(f"diffusion_model.{k}" in comfy_keys for k in state.signature)


def on_pre_run(patcher):
    """ON_PRE_RUN: bring the UNet to the set this patcher wants; it becomes the owner."""
    wanted = hotswap_set(patcher)
    if wanted is None:
        return
    unet = patcher.get_model_object("diffusion_model")  # at pre-run: the module this clone samples with
    state = lora_state(unet)
    own = owner_of(patcher, unet)
    with state.lock:
        if state.owner is not own:
            own.lazy = False  # until the set is in: a failed fuse is undone at cleanup
            state.owner = own
        report = apply_loras(unet, list(wanted.specs), wanted.config)
        own.lazy = not _overlaps_comfy_patches(patcher, state)
    key = tuple(wanted.specs)
    if state.last_run != key:  # the log says "swapped" only when the set changes
        state.last_run = key
        logger.info("SD Accel LoRA Hot-Swap: %s (no reload, no recompile).", report.summary())
        events.emit("lora_swap", loras=[{"name": n, "strength": s, "layers": k} for n, s, k in report.applied],
                    layers_changed=report.layers_changed, seconds=report.seconds)
    else:
        logger.debug("SD Accel LoRA Hot-Swap: %s", report.summary())


def on_cleanup(patcher):
    """ON_CLEANUP: restore after a run whose deltas may not stay (see `Owner.lazy`)."""
    own = patcher.__dict__.get(OWNER_ATTR)
    if own is not None and not own.lazy:
        release(own)


def _keeps_fused(patcher, own: Owner) -> bool:
    """At a detach inside `load_models_gpu`: is the patcher about to be loaded one the fused set is right for?"""
    nxt = _sampling.get()
    if nxt is patcher:
        return True  # reloaded for its own run
    if nxt is None or not own.lazy or nxt.patches_uuid != patcher.patches_uuid or hotswap_set(nxt) != hotswap_set(patcher):
        return False
    # Same set over the same ComfyUI patches (one hot-swap MODEL behind two samplers, one of
    # them through a ModelSamplingDiscrete node): nothing to restore; the next patcher takes over.
    nown = owner_of(nxt, own.unet())
    nown.lazy = True
    lora_state(own.unet()).owner = nown
    return True


def on_detach(patcher, unpatch_all=True):
    """ON_DETACH: restore unless the patcher is reloaded for its own run (or a twin takes over)."""
    own = patcher.__dict__.get(OWNER_ATTR)
    if own is None or own.unet() is None:
        return
    state = lora_state(own.unet())
    with state.lock:
        if state.owner is not own or (not unpatch_all and _keeps_fused(patcher, own)):
            return
    release(own)


def outer_sample(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: marks the patcher being sampled for the detaches during its load."""
    # OUTER_SAMPLE runs around the model load: a detach during it can tell a reload of the
    # patcher being sampled from a switch to another clone.
    token = _sampling.set(getattr(executor.class_obj, "model_patcher", None))
    try:
        return executor(*args, **kwargs)
    finally:
        _sampling.reset(token)


__all__ = ["LORA_KEY", "HotSwapSet", "hotswap_set", "on_pre_run", "on_cleanup", "on_detach", "outer_sample"]
