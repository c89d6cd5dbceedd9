"""ComfyUI host for the step cache: block replacements and one wrapper on a clone of the MODEL.

- `patches_replace["dit"][(name, i)]` for every block the family lets a cache cut (Flux's double
  and single blocks, Qwen-Image's, Wan's and Z-Image's blocks; NextDiT's forward offers no such
  hook, so its blocks get BlockHooks as object patches, blockhooks.py): each (the core's
  `stepcache_route.BlockReplacement`, which Forge Neo's host shares) hands the call to the run's
  `StepCacheRun.block`, which runs the block (through any replacement that was there before
  ours) or stands in for it.
- OUTER_SAMPLE ("sd_accel.stepcache"): a fresh `StepCacheRun` per sampling run, in a per-run
  copy of the model options (ComfyUI's EasyCache pattern), told the run's sigmas and where they lie
  in the whole schedule (runs.schedule_span: a KSamplerAdvanced stage covers part of it, and the
  start/end window means the same points of the denoising in every stage); finished at the end
  (one summary line, a `stepcache_stats` event).
- APPLY_MODEL (same key): a call with a ControlNet's output gets a copy of its transformer_options
  that says so (`CONTROLLED`): ComfyUI adds that output between the blocks, so the run keeps the
  middle's change without it (stepcache_route, `StepCacheRun.block`'s `between`).

A UNet (SD1.x/SD2.x/SDXL) has no block hooks: it is cut at a skip connection by DeepCache's host
over the same runtime (`deepcaching.unet_cut`: front_blocks - 1 is the depth).

The blocks themselves are untouched: with Compile Model's regional compile on the same model
(either node order) each block stays compiled once; a cached call calls fewer of them.
"""
from __future__ import annotations

from ...deepcaching import unet_cut
from ...families import family_of
from ...log import logger
from ...stepcache import Cuts, StepCacheConfig, StepCacheRun, cut_points
from ...stepcache_route import CONTROLLED, STEPCACHE_KEY, BlockReplacement, prior_entry
from .blockhooks import install_block_hooks
from .deepcache import apply_deepcache
from .model import check_model, wrappers_mp
from .runs import run_per_sampling


def _begin(run, sigmas, span):
    run.begin(sigmas, span=span)


def _outer_sample_wrapper(executor, *args, **kwargs):
    return run_per_sampling(executor, args, kwargs, STEPCACHE_KEY, StepCacheRun, _begin)


_CONTROL_AT, _OPTIONS_AT = 4, 5  # BaseModel.apply_model(x, t, c_concat, c_crossattn, control, transformer_options, ...)


def _apply_model_wrapper(executor, *args, **kwargs):
    control = args[_CONTROL_AT] if len(args) > _CONTROL_AT else kwargs.get("control")
    if control:
        if len(args) > _OPTIONS_AT:
            args = (*args[:_OPTIONS_AT], {**(args[_OPTIONS_AT] or {}), CONTROLLED: True}, *args[_OPTIONS_AT + 1:])
        else:
            kwargs["transformer_options"] = {**(kwargs.get("transformer_options") or {}), CONTROLLED: True}
    return executor(*args, **kwargs)


def apply_step_cache(model, config: StepCacheConfig, owner: str = ""):
    """Clone `model` and install the step cache on the clone (a disabled config: a clone without it)."""
    dm = check_model(model, "Step Cache")
    if dm is None:
        return model
    fam = family_of(dm)
    if fam is not None and fam.skip_count is not None and fam.host_walk is not None:  # a UNet: DeepCache's cut of the same runtime
        return apply_deepcache(model, unet_cut(config), steps=config)
    cuts = Cuts(cut_points(dm, hooks=True), config.front_blocks, config.back_blocks)  # raises before anything is cloned
    m = model.clone()
    wmp = wrappers_mp()
    m.remove_wrappers_with_key(wmp.OUTER_SAMPLE, STEPCACHE_KEY)
    m.remove_wrappers_with_key(wmp.APPLY_MODEL, STEPCACHE_KEY)
    to = m.model_options.setdefault("transformer_options", {})
    to.pop(STEPCACHE_KEY, None)
    dit = to.get("patches_replace", {}).get("dit", {})
    for point in cuts.points:  # take ours out (a re-applied node), keep anyone else's
        prev = prior_entry(dit.get(point))
        if prev is None:
            dit.pop(point, None)
        else:
            dit[point] = prev
    if not config.enabled:
        logger.info("SD Accel Step Cache: this setting caches no call (interval 1 / max_cached 0), so every block runs.")
        return m
    install_block_hooks(m, family_of(dm), dm)  # NextDiT: the hook its forward lacks (blockhooks.py)
    for name, i in cuts.points:
        m.set_model_patch_replace(BlockReplacement((name, i), dit.get((name, i))), "dit", name, i)
    m.model_options["transformer_options"][STEPCACHE_KEY] = StepCacheRun(config, cuts, owner)
    m.add_wrapper_with_key(wmp.OUTER_SAMPLE, STEPCACHE_KEY, _outer_sample_wrapper)
    m.add_wrapper_with_key(wmp.APPLY_MODEL, STEPCACHE_KEY, _apply_model_wrapper)
    return m


__all__ = ["apply_step_cache", "STEPCACHE_KEY", "BlockReplacement"]
