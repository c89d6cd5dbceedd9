"""ComfyUI host for DeepCache: keyed wrappers on a clone of the MODEL, over the core's runner and walk.

- OUTER_SAMPLE ("sd_accel.deepcache"): gives each sampling run a fresh DeepCacheRunner in a
  per-run copy of the model options (the EasyCache pattern) with the run's sigmas, and
  finishes it (one summary line, a `deepcache_stats` event).
- DIFFUSION_MODEL ("sd_accel.deepcache"): hands the runner the call's step (its sigma) and
  cond chunks; the runner picks the full or the shallow path of the core's LDM walk, which
  then runs as the innermost callable of the remaining DIFFUSION_MODEL wrappers.

`COMFY` (deepcache_walk.py) tells the walk how ComfyUI's `UNetModel._forward` calls its blocks. With
SDAccelCompileUNet on the same model (either node order) the paths are compiled once each
with the compile node's config.
"""
from __future__ import annotations

from ...deepcaching import DeepCacheConfig, DeepCacheRunner, check_depth
from ...stepcache import StepCacheConfig
from ...log import logger
from .compile import active_compile_config, is_compile_wrapper
from .deepcache_walk import COMFY, ComfyHooks, paths  # noqa: F401  (re-exported)
from .model import check_model, wrappers_mp
from .runs import run_per_sampling
from .native import step_aside

DEEPCACHE_KEY = "sd_accel.deepcache"


def _chunk_keys(to: dict, batch: int) -> tuple:
    # One entry per cond chunk in the batch (cond and uncond may come together or apart).
    for name in ("uuids", "cond_or_uncond"):
        v = to.get(name)
        if v and batch % len(v) == 0:
            return tuple(v)
    return ("all",)


def _floats(t) -> list[float]:
    return t.detach().flatten().float().cpu().tolist()


def _rest_of_chain(to: dict):
    """The DIFFUSION_MODEL wrappers after ours in this call, with the index to start at, or None.

    The chain is the one ComfyUI's UNetModel.forward builds (get_all_wrappers of the call's
    transformer_options); ours is found in it by identity. Compile UNet's wrapper is left out: it
    would put the whole compiled UNet where the chosen path (compiled with its config) goes."""
    from comfy.patcher_extension import get_all_wrappers

    chain = [w for w in get_all_wrappers(wrappers_mp().DIFFUSION_MODEL, to) if not is_compile_wrapper(w)]
    return next(((chain, i + 1) for i, w in enumerate(chain) if w is _diffusion_model_wrapper), None)


def _diffusion_model_wrapper(executor, *args, **kwargs):
    to = args[5] if len(args) > 5 else kwargs.get("transformer_options")
    runner = to.get(DEEPCACHE_KEY) if isinstance(to, dict) else None
    if not isinstance(runner, DeepCacheRunner) or not runner.running:
        return executor(*args, **kwargs)
    sigmas = to.get("sigmas")
    if not runner.run.schedule:
        ss = to.get("sample_sigmas")
        if ss is None or sigmas is None:
            runner.disable("ComfyUI did not pass the sigma schedule (sample_sigmas) to the model")
            return executor(*args, **kwargs)
        runner.begin(_floats(ss), len(ss) - 1)
    rest = _rest_of_chain(to)
    if rest is None:
        runner.disable("this call's DIFFUSION_MODEL wrappers do not include DeepCache's (called through another chain)")
        return executor(*args, **kwargs)
    x, unet = args[0], executor.class_obj
    step = runner.step_at(float(sigmas.flatten()[0]))
    path = runner.select(step, _chunk_keys(to, x.shape[0]), x, paths(unet, runner.config.cache_depth, active_compile_config(to)))
    # The wrappers after ours run with the chosen path in place of UNetModel._forward: a new executor
    # over the same chain (WrapperExecutor.new_class_executor, ComfyUI's public constructor).
    from comfy.patcher_extension import WrapperExecutor

    chain, after = rest
    return WrapperExecutor.new_class_executor(path, unet, chain, after).execute(*args, **kwargs)


def _begin(runner, sigmas, span):
    if sigmas is not None:
        runner.begin(sigmas, len(sigmas) - 1, span)
    else:
        runner.begin()  # the schedule comes from transformer_options["sample_sigmas"] on the first call


def _outer_sample_wrapper(executor, *args, **kwargs):
    # A fresh runner per run, in a per-run copy of the model options; the patcher's own stays empty.
    return run_per_sampling(executor, args, kwargs, DEEPCACHE_KEY, DeepCacheRunner, _begin)


def apply_deepcache(model, config: DeepCacheConfig, steps: StepCacheConfig | None = None):
    """Clone `model` and install DeepCache on the clone (interval 1: a clone without it); `steps`: the
    Step Cache node's settings when it cuts a UNet (see deepcaching.unet_cut)."""
    unet = check_model(model, "DeepCache")
    if unet is None or step_aside("deepcache", model, "DeepCache"):  # ComfyUI's own graphs/compiler act on it
        return model
    check_depth(unet, config)
    m = model.clone()
    wmp = wrappers_mp()
    m.remove_wrappers_with_key(wmp.OUTER_SAMPLE, DEEPCACHE_KEY)
    m.remove_wrappers_with_key(wmp.DIFFUSION_MODEL, DEEPCACHE_KEY)
    m.model_options.setdefault("transformer_options", {}).pop(DEEPCACHE_KEY, None)
    if not config.enabled:
        logger.info("SD Accel DeepCache: cache_interval 1, so every step runs the full UNet (DeepCache off).")
        return m
    m.model_options["transformer_options"][DEEPCACHE_KEY] = DeepCacheRunner(config, steps=steps)
    m.add_wrapper_with_key(wmp.OUTER_SAMPLE, DEEPCACHE_KEY, _outer_sample_wrapper)
    m.add_wrapper_with_key(wmp.DIFFUSION_MODEL, DEEPCACHE_KEY, _diffusion_model_wrapper)
    return m


__all__ = ["apply_deepcache", "DEEPCACHE_KEY", "COMFY", "ComfyHooks", "paths"]
