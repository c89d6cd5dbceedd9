"""ComfyUI host for DeepCache: keyed wrappers on a clone of the MODEL.

- OUTER_SAMPLE ("sd_accel.deepcache"): gives each sampling run a fresh DeepCacheState in a
  per-run copy of the model options (the EasyCache pattern), then logs one summary line and
  emits `deepcache_stats`.
- DIFFUSION_MODEL ("sd_accel.deepcache"): decides per call, in eager Python, whether this
  step runs the full UNet (keeping the feature at the cut) or only its shallow blocks, and
  runs that path as the innermost callable of the remaining DIFFUSION_MODEL wrappers.

Both paths are re-walks of `UNetModel._forward` (comfy/ldm/modules/diffusionmodules/
openaimodel.py, identical in 0.3.64 and 0.8.0): same patches, same ControlNet residuals for
the blocks that run. With SDAccelCompileUNet on the same model (either node order) the
paths are compiled once each with the compile node's config (`hosts.comfy.compiled_path`).
"""
from __future__ import annotations

import functools
import weakref

import torch

from ..deepcache import _CUDAGRAPH_MODES, DeepCacheConfig, DeepCacheState, check_depth, drop_skipped_control
from ..log import logger
from .comfy import _check_model, _wrappers_mp, active_compile_config, compiled_path

DEEPCACHE_KEY = "sd_accel.deepcache"
_skipped: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


# --- the two paths ----------------------------------------------------------------------------

def _skipped_transformers(unet, depth: int) -> int:
    """Spatial transformers in the blocks a shallow step skips, so transformer_index stays what the full walk has."""
    from comfy.ldm.modules.attention import SpatialTransformer, SpatialVideoTransformer

    j0 = len(unet.input_blocks) - 1 - depth
    mods = list(unet.input_blocks[depth + 1:]) + ([unet.middle_block] if unet.middle_block is not None else []) + list(unet.output_blocks[:j0])
    return sum(1 for m in mods for layer in m if isinstance(layer, (SpatialTransformer, SpatialVideoTransformer)))


def _ldm_walk(unet, depth: int, skipped: int, cached, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
    """UNetModel._forward cut at skip `depth` (input block `depth`, consumed by output block N-1-depth).

    Full (`cached` None): returns (output, the h entering output block N-1-depth). Shallow: runs
    input blocks 0..depth, then output blocks N-1-depth.. starting from `cached`; returns the output.
    """
    from comfy.ldm.modules.diffusionmodules.openaimodel import apply_control, forward_timestep_embed, timestep_embedding

    shallow = cached is not None
    to = transformer_options
    to["original_shape"] = list(x.shape)
    to["transformer_index"] = 0
    patches = to.get("patches", {})
    nvf = kwargs.get("num_video_frames", unet.default_num_video_frames)
    iii = kwargs.get("image_only_indicator", None)
    tc = kwargs.get("time_context", None)
    if (y is not None) != (unet.num_classes is not None):
        raise ValueError("must specify y if and only if the model is class-conditional")
    j0 = len(unet.input_blocks) - 1 - depth

    t_emb = timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(x.dtype)
    emb = unet.time_embed(t_emb)
    for p in patches.get("emb_patch", ()):
        emb = p(emb, unet.model_channels, to)
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)

    hs = []
    h = x
    for id, module in enumerate(unet.input_blocks):
        if shallow and id > depth:
            break
        to["block"] = ("input", id)
        h = forward_timestep_embed(module, h, emb, context, to, time_context=tc, num_video_frames=nvf, image_only_indicator=iii)
        h = apply_control(h, control, "input")
        for p in patches.get("input_block_patch", ()):
            h = p(h, to)
        hs.append(h)
        for p in patches.get("input_block_patch_after_skip", ()):
            h = p(h, to)

    if shallow:
        drop_skipped_control(control, j0)
        if "transformer_index" in to:
            to["transformer_index"] += skipped
        # Output block patches (FreeU, ...) may change h in place: the kept feature must stay as kept.
        h = cached.clone() if "output_block_patch" in patches else cached
    else:
        to["block"] = ("middle", 0)
        if unet.middle_block is not None:
            h = forward_timestep_embed(unet.middle_block, h, emb, context, to, time_context=tc, num_video_frames=nvf, image_only_indicator=iii)
        h = apply_control(h, control, "middle")

    captured = None
    for id, module in enumerate(unet.output_blocks):
        if shallow and id < j0:
            continue
        to["block"] = ("output", id)
        if id == j0 and not shallow:
            captured = h.clone() if "output_block_patch" in patches else h
        hsp = hs.pop()
        hsp = apply_control(hsp, control, "output")
        for p in patches.get("output_block_patch", ()):
            h, hsp = p(h, hsp, to)
        h = torch.cat([h, hsp], dim=1)
        del hsp
        output_shape = hs[-1].shape if len(hs) > 0 else None
        h = forward_timestep_embed(module, h, emb, context, to, output_shape, time_context=tc, num_video_frames=nvf, image_only_indicator=iii)
    h = h.type(x.dtype)
    out = unet.id_predictor(h) if unet.predict_codebook_ids else unet.out(h)
    return out if shallow else (out, captured)


def _ldm_full(unet, depth, skipped, *args, **kwargs):
    return _ldm_walk(unet, depth, skipped, None, *args, **kwargs)


def _ldm_shallow(unet, depth, skipped, cached, *args, **kwargs):
    return _ldm_walk(unet, depth, skipped, cached, *args, **kwargs)


def _paths(unet, depth: int, compile_config):
    """(full, shallow) callables for this UNet and depth: eager, or compiled once each with the compile node's config."""
    per_unet = _skipped.setdefault(unet, {})
    if depth not in per_unet:
        per_unet[depth] = _skipped_transformers(unet, depth)
    skipped = per_unet[depth]
    full = functools.partial(_ldm_full, unet, depth, skipped)
    shallow = functools.partial(_ldm_shallow, unet, depth, skipped)
    if compile_config is None:
        return full, shallow
    return (compiled_path(unet, compile_config, f"deepcache full d{depth}", full),
            compiled_path(unet, compile_config, f"deepcache shallow d{depth}", shallow))


# --- wrappers --------------------------------------------------------------------------------

def _chunk_keys(to: dict, batch: int) -> tuple:
    # One entry per cond chunk in the batch (cond and uncond may come together or apart).
    for name in ("uuids", "cond_or_uncond"):
        v = to.get(name)
        if v and batch % len(v) == 0:
            return tuple(v)
    return ("all",)


def _continue(executor, original, args, kwargs):
    """Run the DIFFUSION_MODEL wrappers after ours, with `original` in place of UNetModel._forward."""
    from comfy.patcher_extension import WrapperExecutor

    return WrapperExecutor.new_class_executor(original, executor.class_obj, executor.wrappers, executor.idx + 1).execute(*args, **kwargs)


def _diffusion_model_wrapper(executor, *args, **kwargs):
    to = args[5] if len(args) > 5 else kwargs.get("transformer_options")
    state = to.get(DEEPCACHE_KEY) if isinstance(to, dict) else None
    if not isinstance(state, DeepCacheState) or not state.running or not state.config.enabled:
        return executor(*args, **kwargs)
    sigmas = to.get("sigmas")
    if not state.schedule:
        ss = to.get("sample_sigmas")
        if ss is None or sigmas is None:
            state.disable("ComfyUI did not pass the sigma schedule (sample_sigmas) to the model")
            return executor(*args, **kwargs)
        state.begin(ss.detach().flatten().float().cpu().tolist(), len(ss) - 1)
    x = args[0]
    step = state.step_of(float(sigmas.flatten()[0]))
    unet = executor.class_obj
    cfg = active_compile_config(to)
    full, shallow = _paths(unet, state.config.cache_depth, cfg)
    keys = _chunk_keys(to, x.shape[0])
    state.check_metadata(x)
    cached = None if state.wants_full(step) else state.lookup(keys, x.shape[0])
    state.mark(step, cached is None)
    if cached is None:
        copy_kept = cfg is not None and cfg.mode in _CUDAGRAPH_MODES  # CUDA-graph outputs are overwritten by the next replay

        def original(*a, **k):
            out, kept = full(*a, **k)
            state.store(keys, kept.clone() if copy_kept else kept, step)
            return out
    else:
        def original(*a, **k):
            return shallow(cached, *a, **k)
    return _continue(executor, original, args, kwargs)


def _outer_sample_wrapper(executor, *args, **kwargs):
    # A fresh state per run, in a per-run copy of the model options; the patcher's own stays empty.
    import comfy.model_patcher

    guider = executor.class_obj
    orig = guider.model_options
    template = orig.get("transformer_options", {}).get(DEEPCACHE_KEY)
    if not isinstance(template, DeepCacheState):
        return executor(*args, **kwargs)
    guider.model_options = comfy.model_patcher.create_model_options_clone(orig)
    state = template.fresh()
    guider.model_options["transformer_options"][DEEPCACHE_KEY] = state
    sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
    if sigmas is not None:
        state.begin(sigmas.detach().flatten().float().cpu().tolist(), len(sigmas) - 1)
    else:
        state.running = True  # the schedule comes from transformer_options["sample_sigmas"] on the first call
    try:
        return executor(*args, **kwargs)
    finally:
        state.finish()
        guider.model_options = orig


def apply_deepcache(model, config: DeepCacheConfig):
    """Clone `model` and install DeepCache on the clone (interval 1: a clone without it)."""
    unet = _check_model(model, "DeepCache")
    if unet is None:
        return model
    check_depth(unet, config)
    m = model.clone()
    wmp = _wrappers_mp()
    m.remove_wrappers_with_key(wmp.OUTER_SAMPLE, DEEPCACHE_KEY)
    m.remove_wrappers_with_key(wmp.DIFFUSION_MODEL, DEEPCACHE_KEY)
    m.model_options.setdefault("transformer_options", {}).pop(DEEPCACHE_KEY, None)
    if not config.enabled:
        logger.info("SD Accel DeepCache: cache_interval 1, so every step runs the full UNet (DeepCache off).")
        return m
    m.model_options["transformer_options"][DEEPCACHE_KEY] = DeepCacheState(config)
    m.add_wrapper_with_key(wmp.OUTER_SAMPLE, DEEPCACHE_KEY, _outer_sample_wrapper)
    m.add_wrapper_with_key(wmp.DIFFUSION_MODEL, DEEPCACHE_KEY, _diffusion_model_wrapper)
    return m


__all__ = ["apply_deepcache", "DEEPCACHE_KEY"]
