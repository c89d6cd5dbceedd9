"""stable-diffusion-webui (AUTOMATIC1111) and Forge: the public face the extension's scripts import.

The scripts (`scripts/sd_accel_*.py`) hold the UI. What they use lives in small modules,
re-exported here: options and parsing (`webui_options`), infotext (`webui_infotext`), what is
available and what was applied (`webui_status`), LoRA files (`webui_lora`). The installers
are `webui_a1111` (instance `forward` on the UNet for one generation) and `webui_forge`
(`model_function_wrapper` on a clone of Forge's UNet patcher), with `webui_hosts` choosing
between them; both run `webui_runner`.

Compiled callables and cast copies are kept in accel_core's registry, on the UNet module
itself, so they live exactly as long as that checkpoint's UNet: a checkpoint change never
runs a stale compiled UNet, and an unloaded one frees its graphs. DeepCache runs the core's
walk and runner with the A1111 / Forge hooks of `webui_deepcache`.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import registry
from ..cast import ATTENTION, CastConfig, cast  # noqa: F401  (ATTENTION: re-exported for the scripts)
from ..compile import MODES, CompileConfig, CompiledUNet  # noqa: F401  (MODES: re-exported)
from ..errors import SDAccelError
from .webui_deepcache import DeepCacheRun, deepcache_paths
from .webui_infotext import K_CAST, K_COMPILE, K_DEEPCACHE, K_LCM, K_LORA, K_STATUS, SETTING_KEYS, from_infotext, infotext_field, to_infotext
from .webui_lora import fuse_loras, lora_files, lora_specs, restore_loras
from .webui_options import (BACKEND_CHOICES, DTYPE_CHOICES, NO_LORA, OFF, SETTINGS_FIELDS, UI_FIELDS, WebuiOptions, format_loras,
                            options_from_args, parse_loras, with_overrides)
from .webui_status import FEATURES, Applied, backend_table, feature_module, feature_status, last_applied

# --- per-UNet artifacts (the core's registry) ---------------------------------------------------------


class _Artifacts:
    # The registry under its earlier name, for callers not moved yet (`_Artifacts.of(module).compiled`).
    of = staticmethod(registry.artifacts)


def compiled_for(module: nn.Module, config: CompileConfig) -> CompiledUNet:
    return registry.compiled_for(module, config)


def _weights_token(module: nn.Module):
    # Changes when the webui loads other weights into the same module (checkpoint switch with
    # the same architecture) or patches them in place (LoRA applied to the original).
    params = list(module.parameters())
    return (len(params), params[0].data_ptr() if params else 0, sum(p._version for p in params))


def cast_copy_for(unet: nn.Module, config: CastConfig) -> nn.Module:
    """The UNet cast per `config`, made once per (weights, config); one copy is kept per UNet (in the registry)."""
    art = registry.artifacts(unet)
    key = (config.dtype, config.channels_last, _weights_token(unet))
    if art.copy_key != key:
        art.copy, art.copy_key = None, None  # free the old copy before making the new one
        copy = cast(unet, CastConfig(dtype=config.dtype, channels_last=config.channels_last))
        _norms_to_fp32(copy)
        art.copy, art.copy_key = copy, key
    return art.copy


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
    n = registry.clear()
    torch._dynamo.reset()
    return n


def _key_label(key) -> str:
    # CompileConfig for the whole UNet, (CompileConfig, path name) for DeepCache's full/shallow paths.
    cfg, name = key if isinstance(key, tuple) else (key, "")
    return f"{cfg.backend} {cfg.mode}" + (f" [{name}]" if name else "")


def cache_state() -> list[dict]:
    """One entry per module with SD Accel artifacts (a webui UNet or SD Accel's cast copy of one)."""
    arts = registry.modules()
    copies = {id(a.copy): a.copy_key for _, a in arts if a.copy is not None}
    out = []
    for module, art in arts:
        kind = f"cast copy ({copies[id(module)][0]}{', channels_last' if copies[id(module)][1] else ''})" if id(module) in copies else "webui UNet"
        out.append({
            "module": f"{type(module).__name__} at {id(module):#x}, {kind}",
            "cast_copy": art.copy is not None,
            "compiled": [{"config": _key_label(key), "status": cu.report.status, "summary": cu.report.summary()}
                         for key, cu in art.compiled.items()],
        })
    return out


# --- DeepCache: the core's walk and runner, with the webui hooks (webui_deepcache) ----------------------

_DeepCacheRun = DeepCacheRun


__all__ = ["WebuiOptions", "UI_FIELDS", "SETTINGS_FIELDS", "BACKEND_CHOICES", "DTYPE_CHOICES", "OFF", "NO_LORA", "ATTENTION", "MODES",
           "SDAccelError", "parse_loras", "format_loras", "options_from_args", "with_overrides",
           "K_COMPILE", "K_CAST", "K_DEEPCACHE", "K_LCM", "K_LORA", "K_STATUS", "SETTING_KEYS", "to_infotext", "from_infotext", "infotext_field",
           "FEATURES", "feature_module", "feature_status", "Applied", "last_applied", "backend_table",
           "lora_files", "lora_specs", "fuse_loras", "restore_loras",
           "compiled_for", "cast_copy_for", "clear_caches", "cache_state", "deepcache_paths"]
