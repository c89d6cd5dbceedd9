"""stable-diffusion-webui (AUTOMATIC1111) and Forge: the public face the extension's scripts import.

The scripts (`scripts/sd_accel_*.py`) hold the UI. What they use lives in small modules,
re-exported here: options and parsing (`webui_options`), infotext (`webui_infotext`), what is
available and what was applied (`webui_status`), LoRA files (`webui_lora`). The installers
are `webui_a1111` (instance `forward` on the UNet for one generation) and `webui_forge`
(`model_function_wrapper` on a clone of Forge's UNet patcher), with `webui_hosts` choosing
between them; both run `webui_runner`.

This module also holds, for now, the per-UNet artifacts (compiled callables and cast copies)
and the DeepCache walks over the webui UNets, on their way into accel_core's registry and
DeepCache runner.

Compiled callables and cast copies hang off the UNet module itself (`_Artifacts`), so they
live exactly as long as that checkpoint's UNet: a checkpoint change never runs a stale
compiled UNet, and an unloaded one frees its graphs (a WeakKeyDictionary would not: its
values, holding the module, keep the key alive).
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch import nn

from ..cast import ATTENTION, CastConfig, cast  # noqa: F401  (ATTENTION: re-exported for the scripts)
from ..compile import MODES, CompileConfig, CompiledUNet  # noqa: F401  (MODES: re-exported)
from ..errors import SDAccelError
from .webui_infotext import K_CAST, K_COMPILE, K_DEEPCACHE, K_LCM, K_LORA, K_STATUS, SETTING_KEYS, from_infotext, infotext_field, to_infotext
from .webui_lora import fuse_loras, lora_files, lora_specs, restore_loras
from .webui_options import (BACKEND_CHOICES, DTYPE_CHOICES, NO_LORA, OFF, SETTINGS_FIELDS, UI_FIELDS, WebuiOptions, format_loras,
                            options_from_args, parse_loras, with_overrides)
from .webui_status import FEATURES, Applied, backend_table, feature_module, feature_status, last_applied

# --- per-UNet artifacts -----------------------------------------------------------------------------

_ATTR = "_sd_accel_artifacts"
_MISSING = object()
_live: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class _Artifacts:
    """Compiled callables and the cast copy that belong to one UNet module (stored on it)."""

    def __init__(self):
        self.compiled: dict[CompileConfig, CompiledUNet] = {}
        self.cast_key = None
        self.cast_copy: nn.Module | None = None

    def __deepcopy__(self, memo):
        return _Artifacts()  # a copy of the UNet (our own cast copy included) starts empty

    @staticmethod
    def of(module: nn.Module) -> "_Artifacts":
        art = module.__dict__.get(_ATTR)
        if not isinstance(art, _Artifacts):
            art = _Artifacts()
            module.__dict__[_ATTR] = art  # a plain attribute: no submodule, no state_dict entry
        _live.add(module)  # also for a copy that came with an empty one (see __deepcopy__)
        return art


def compiled_for(module: nn.Module, config: CompileConfig) -> CompiledUNet:
    art = _Artifacts.of(module)
    if config not in art.compiled:
        art.compiled[config] = CompiledUNet(module, config)
    return art.compiled[config]


def _weights_token(module: nn.Module):
    # Changes when the webui loads other weights into the same module (checkpoint switch with
    # the same architecture) or patches them in place (LoRA applied to the original).
    params = list(module.parameters())
    return (len(params), params[0].data_ptr() if params else 0, sum(p._version for p in params))


def cast_copy_for(unet: nn.Module, config: CastConfig) -> nn.Module:
    """The UNet cast per `config`, made once per (weights, config); one copy is kept per UNet."""
    art = _Artifacts.of(unet)
    key = (config.dtype, config.channels_last, _weights_token(unet))
    if art.cast_key != key:
        art.cast_copy, art.cast_key = None, None  # free the old copy before making the new one
        copy = cast(unet, CastConfig(dtype=config.dtype, channels_last=config.channels_last))
        _norms_to_fp32(copy)
        art.cast_copy, art.cast_key = copy, key
    return art.cast_copy


def _norms_to_fp32(module: nn.Module) -> None:
    # The webui UNets' GroupNorm32 runs in fp32 (`super().forward(x.float())`) and relies on
    # CUDA autocast to upcast fp16 weights; CPU has no such cast ("mixed dtype (CPU)"). Norm
    # weights are tiny, so they stay fp32 in the copy, which every device accepts.
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                for name, p in list(m.named_parameters(recurse=False)):
                    if p.is_floating_point() and p.dtype != torch.float32:
                        setattr(m, name, nn.Parameter(p.float(), requires_grad=False))


def clear_caches() -> int:
    """Drop every compiled callable and cast copy (the Settings tab's "Clear" button). Returns how many UNets had some."""
    n = 0
    for module in list(_live):
        if module.__dict__.pop(_ATTR, None) is not None:
            n += 1
    _live.clear()
    torch._dynamo.reset()
    return n


def _key_label(key) -> str:
    # CompileConfig for the whole UNet, (CompileConfig, path name) for DeepCache's full/shallow paths.
    cfg, name = key if isinstance(key, tuple) else (key, "")
    return f"{cfg.backend} {cfg.mode}" + (f" [{name}]" if name else "")


def cache_state() -> list[dict]:
    """One entry per module with SD Accel artifacts (a webui UNet or SD Accel's cast copy of one)."""
    arts = [(m, m.__dict__.get(_ATTR)) for m in list(_live)]
    arts = [(m, a) for m, a in arts if isinstance(a, _Artifacts)]
    copies = {id(a.cast_copy): a.cast_key for _, a in arts if a.cast_copy is not None}
    out = []
    for module, art in arts:
        kind = f"cast copy ({copies[id(module)][0]}{', channels_last' if copies[id(module)][1] else ''})" if id(module) in copies else "webui UNet"
        out.append({
            "module": f"{type(module).__name__} at {id(module):#x}, {kind}",
            "cast_copy": art.cast_copy is not None,
            "compiled": [{"config": _key_label(key), "status": cu.report.status, "summary": cu.report.summary()}
                         for key, cu in art.compiled.items()],
        })
    return out


# --- DeepCache walks over the webui UNets ---------------------------------------------------------------
# Each is the host's UNetModel.forward, walked block by block and cut at skip `depth`
# (input block `depth`, consumed by output block N-1-depth), as hosts/comfy_deepcache.py does
# for ComfyUI. Full (`cached` None): returns (output, the h entering output block N-1-depth).
# Shallow: input blocks 0..depth, then output blocks N-1-depth.. from `cached`.


def _a1111_walk(unet, depth: int, cached, x, timesteps=None, context=None, y=None, **kwargs):
    """A1111's ldm (SD1.x/2.x) and sgm (SDXL) UNetModel.forward (repositories/stable-diffusion-stability-ai
    and generative-models at the commits webui 1.10 pins)."""
    import sys

    # The module's own timestep_embedding (the webui may have patched it there).
    timestep_embedding = sys.modules[type(unet).__module__].timestep_embedding
    shallow = cached is not None
    if (y is not None) != (unet.num_classes is not None):
        raise ValueError("must specify y if and only if the model is class-conditional")
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False))
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)
    h = x.type(unet.dtype) if type(unet).__module__.startswith("ldm.") else x  # sgm's forward leaves x as is
    hs = []
    for i, module in enumerate(unet.input_blocks):
        if shallow and i > depth:
            break
        h = module(h, emb, context)
        hs.append(h)
    h = cached if shallow else unet.middle_block(h, emb, context)
    j0 = len(unet.input_blocks) - 1 - depth
    captured = None
    for j, module in enumerate(unet.output_blocks):
        if shallow and j < j0:
            continue
        if j == j0 and not shallow:
            captured = h
        h = torch.cat([h, hs.pop()], dim=1)
        h = module(h, emb, context)
    out = unet.out(h.type(x.dtype))
    return out if shallow else (out, captured)


def _forge_walk(unet, depth: int, cached, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
    """Forge's IntegratedUNet2DConditionModel.forward (backend/nn/unet.py, June 2025), with its block
    modifiers, block patches and ControlNet residuals for the blocks that run."""
    from backend.nn.unet import apply_control, timestep_embedding

    from ..deepcache import drop_skipped_control

    shallow = cached is not None
    to = transformer_options
    to["original_shape"] = list(x.shape)
    to["transformer_index"] = 0
    patches = to.get("patches", {})
    modifiers = to.get("block_modifiers", [])
    if (y is not None) != (unet.num_classes is not None):
        raise ValueError("must specify y if and only if the model is class-conditional")
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(x.dtype))
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)
    j0 = len(unet.input_blocks) - 1 - depth
    hs, h = [], x
    for i, module in enumerate(unet.input_blocks):
        if shallow and i > depth:
            break
        to["block"] = ("input", i)
        for m in modifiers:
            h = m(h, "before", to)
        h = module(h, emb, context, to)
        h = apply_control(h, control, "input")
        for m in modifiers:
            h = m(h, "after", to)
        for p in patches.get("input_block_patch", ()):
            h = p(h, to)
        hs.append(h)
        for p in patches.get("input_block_patch_after_skip", ()):
            h = p(h, to)
    if shallow:
        drop_skipped_control(control, j0)
        h = cached.clone() if "output_block_patch" in patches else cached
    else:
        to["block"] = ("middle", 0)
        for m in modifiers:
            h = m(h, "before", to)
        h = unet.middle_block(h, emb, context, to)
        h = apply_control(h, control, "middle")
        for m in modifiers:
            h = m(h, "after", to)
    captured = None
    for j, module in enumerate(unet.output_blocks):
        if shallow and j < j0:
            continue
        to["block"] = ("output", j)
        if j == j0 and not shallow:
            captured = h.clone() if "output_block_patch" in patches else h
        hsp = apply_control(hs.pop(), control, "output")
        for p in patches.get("output_block_patch", ()):
            h, hsp = p(h, hsp, to)
        h = torch.cat([h, hsp], dim=1)
        del hsp
        output_shape = hs[-1].shape if len(hs) > 0 else None
        for m in modifiers:
            h = m(h, "before", to)
        h = module(h, emb, context, to, output_shape)
        for m in modifiers:
            h = m(h, "after", to)
    to["block"] = ("last", 0)
    for m in modifiers:
        h = m(h, "before", to)
    if "group_norm_wrapper" in to:
        h = unet.out[1:](to["group_norm_wrapper"](unet.out[0], h, to))
    else:
        h = unet.out(h)
    for m in modifiers:
        h = m(h, "after", to)
    out = h.type(x.dtype)
    return out if shallow else (out, captured)


def _walk_for(unet):
    if type(unet).__module__.startswith(("ldm.", "sgm.")):
        return _a1111_walk
    if type(unet).__name__ == "IntegratedUNet2DConditionModel":
        return _forge_walk
    return None


def _full_path(walk, unet, depth, *args, **kwargs):
    return walk(unet, depth, None, *args, **kwargs)


def _shallow_path(walk, unet, depth, cached, *args, **kwargs):
    return walk(unet, depth, cached, *args, **kwargs)


def deepcache_paths(unet: nn.Module, depth: int, compile_config: CompileConfig | None):
    """(full, shallow) callables over `unet` cut at `depth`: eager, or compiled once each (kept on the UNet)."""
    walk = _walk_for(unet)
    if walk is None:
        raise SDAccelError(f"SD Accel DeepCache: {type(unet).__module__}.{type(unet).__name__} is not a webui UNet SD Accel can walk "
                           "(A1111's ldm/sgm UNetModel or Forge's IntegratedUNet2DConditionModel).")
    full = functools.partial(_full_path, walk, unet, depth)
    shallow = functools.partial(_shallow_path, walk, unet, depth)
    if compile_config is None:
        return full, shallow
    art = _Artifacts.of(unet)
    out = []
    for name, fn in ((f"deepcache full d{depth}", full), (f"deepcache shallow d{depth}", shallow)):
        key = (compile_config, name)
        if key not in art.compiled:
            art.compiled[key] = CompiledUNet(unet, compile_config, entry=fn, name=name)
        out.append(art.compiled[key])
    return tuple(out)


class _DeepCacheRun:
    """Decides full/shallow per UNet call, in eager Python, from the sampler's denoiser step.

    `progress()` returns (step, total) of the webui's CFGDenoiser (the same counter its own
    skip-early-cond option uses) or None. A new sampling pass (hires fix, next batch) is noticed
    when the total changes or the step goes back; calls within one step are told apart by order.
    """

    def __init__(self, unet, config, compile_config, progress, paths=None):
        from ..deepcache import _CUDAGRAPH_MODES, DeepCacheState, check_depth

        check_depth(unet, config)
        self.full, self.shallow = paths or deepcache_paths(unet, config.cache_depth, compile_config)
        self.state = DeepCacheState(config)
        self.progress = progress
        self.copy_kept = compile_config is not None and compile_config.mode in _CUDAGRAPH_MODES
        self.total, self.last_step, self.call_in_step = None, -1, 0
        self.runs: list[dict] = []

    def __call__(self, x, *args, **kwargs):
        pos = self.progress() if self.progress is not None else None
        if not pos or not pos[1]:
            out, _ = self.full(x, *args, **kwargs)
            return out
        step, total = int(pos[0]), int(pos[1])
        if total != self.total or step < self.last_step:
            self.finish()
            self.state.begin(list(range(total, 0, -1)), total)
            self.total, self.last_step = total, -1
        if step != self.last_step:
            self.last_step, self.call_in_step = step, 0
        keys = (f"call{self.call_in_step}",)
        self.call_in_step += 1
        self.state.check_metadata(x)
        cached = None if self.state.wants_full(step) else self.state.lookup(keys, x.shape[0])
        self.state.mark(step, cached is None)
        if cached is None:
            out, kept = self.full(x, *args, **kwargs)
            self.state.store(keys, kept.clone() if self.copy_kept else kept, step)
            return out
        return self.shallow(cached, x, *args, **kwargs)

    def finish(self):
        if self.state.running:
            self.runs.append(self.state.finish())
        self.total = None


__all__ = ["WebuiOptions", "UI_FIELDS", "SETTINGS_FIELDS", "BACKEND_CHOICES", "DTYPE_CHOICES", "OFF", "NO_LORA", "ATTENTION", "MODES",
           "SDAccelError", "parse_loras", "format_loras", "options_from_args", "with_overrides",
           "K_COMPILE", "K_CAST", "K_DEEPCACHE", "K_LCM", "K_LORA", "K_STATUS", "SETTING_KEYS", "to_infotext", "from_infotext", "infotext_field",
           "FEATURES", "feature_module", "feature_status", "Applied", "last_applied", "backend_table",
           "lora_files", "lora_specs", "fuse_loras", "restore_loras",
           "compiled_for", "cast_copy_for", "clear_caches", "cache_state", "deepcache_paths"]
