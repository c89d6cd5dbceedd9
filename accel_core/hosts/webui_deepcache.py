"""DeepCache on the webui UNets: the hooks that tell the core's LDM walk how A1111 and Forge differ,
and the runner told the step by the webui's denoiser.

The walk and the per-call decision are the core's (families/ldm.py, deepcache.DeepCacheRunner),
the same ones ComfyUI uses; here only what the webui forwards do their own way.
"""
from __future__ import annotations

from torch import nn

from ..compile import CompileConfig
from ..deepcache import DeepCachePaths, DeepCacheRunner, check_depth, cut_paths
from ..errors import SDAccelError
from ..families import ldm


class A1111Hooks(ldm.LdmHooks):
    """A1111's ldm (SD1.x/2.x) and sgm (SDXL) UNetModel.forward (the repositories webui 1.10 pins):
    blocks as `module(h, emb, context)`, no patches, no ControlNet argument."""

    emb_in_x_dtype = False

    def input(self, unet, x):
        return x.type(unet.dtype) if type(unet).__module__.startswith("ldm.") else x  # sgm's forward leaves x as is


class ForgeHooks(ldm.LdmHooks):
    """Forge's IntegratedUNet2DConditionModel.forward (backend/nn/unet.py): block modifiers around
    every block and the last layers, a group-norm wrapper there, and its three block patches."""

    patches = frozenset(("input_block_patch", "input_block_patch_after_skip", "output_block_patch"))

    def block(self, unet, module, h, emb, context, to, output_shape, control, name, kwargs):
        modifiers = to.get("block_modifiers", ())
        for m in modifiers:
            h = m(h, "before", to)
        h = module(h, emb, context, to, output_shape)
        if name:
            h = self.apply_control(h, control, name)
        for m in modifiers:
            h = m(h, "after", to)
        return h

    def out(self, unet, h, x, to):
        to["block"] = ("last", 0)
        modifiers = to.get("block_modifiers", ())
        for m in modifiers:
            h = m(h, "before", to)
        # Forge releases spell the key both ways.
        wrapper = to.get("groupnorm_wrapper") or to.get("group_norm_wrapper")
        h = unet.out[1:](wrapper(unet.out[0], h, to)) if wrapper is not None else unet.out(h)
        for m in modifiers:
            h = m(h, "after", to)
        return h.type(x.dtype)


A1111, FORGE = A1111Hooks(), ForgeHooks()


def hooks_for(unet: nn.Module) -> ldm.LdmHooks | None:
    if type(unet).__module__.startswith(("ldm.", "sgm.")):
        return A1111
    if type(unet).__name__ == "IntegratedUNet2DConditionModel":
        return FORGE
    return None


def cut(unet: nn.Module, depth: int, compile_config: CompileConfig | None) -> DeepCachePaths:
    """The full and shallow paths over a webui UNet cut at `depth`: eager, or compiled once each (kept on the UNet)."""
    hooks = hooks_for(unet)
    if hooks is None:
        raise SDAccelError(f"SD Accel DeepCache: {type(unet).__module__}.{type(unet).__name__} is not a webui UNet SD Accel can walk "
                           "(A1111's ldm/sgm UNetModel or Forge's IntegratedUNet2DConditionModel).")
    return cut_paths(unet, depth, *ldm.paths(unet, hooks, depth), compile_config)


def deepcache_paths(unet: nn.Module, depth: int, compile_config: CompileConfig | None):
    """(full, shallow) callables over `unet` cut at `depth`."""
    p = cut(unet, depth, compile_config)
    return p.full, p.shallow


class DeepCacheRun:
    """The UNet call on DeepCache steps: the core runner, told the step by the sampler's denoiser.

    `progress()` returns (step, total) of the webui's CFGDenoiser (the same counter its own
    skip-early-cond option uses) or None; without it the call runs the full path.
    """

    def __init__(self, unet, config, compile_config, progress, paths=None):
        check_depth(unet, config)
        paths = DeepCachePaths(*paths) if paths is not None else cut(unet, config.cache_depth, compile_config)
        self.runner = DeepCacheRunner(config, paths)
        self.progress = progress

    @property
    def full(self):
        return self.runner.paths.full

    @property
    def runs(self) -> list[dict]:
        return self.runner.runs

    def __call__(self, x, *args, **kwargs):
        pos = self.progress() if self.progress is not None else None
        if not pos or not pos[1]:
            return self.runner.paths.full(x, *args, **kwargs)[0]
        step, keys = self.runner.step_from_progress(int(pos[0]), int(pos[1]))
        return self.runner(step, keys, x, *args, **kwargs)

    def finish(self):
        self.runner.finish()


__all__ = ["A1111Hooks", "ForgeHooks", "A1111", "FORGE", "hooks_for", "cut", "deepcache_paths", "DeepCacheRun"]
