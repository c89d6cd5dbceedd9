"""The webui's compiled callables and cast copies, kept in accel_core's registry (on the UNet module).

They live exactly as long as that checkpoint's UNet: a checkpoint change never runs a stale
compiled UNet, and an unloaded one frees its graphs. The cast copy is the webui's own (norms
kept in fp32 for GroupNorm32); the Settings tab lists and clears what is kept.
"""
from __future__ import annotations

import torch
from torch import nn

from ... import registry
from ...cast import CastConfig, cast


def weights_token(module: nn.Module):
    # Changes when the webui loads other weights into the same module (checkpoint switch with
    # the same architecture) or patches them in place (LoRA applied to the original).
    params = list(module.parameters())
    return (len(params), params[0].data_ptr() if params else 0, sum(p._version for p in params))


def cast_copy_for(unet: nn.Module, config: CastConfig) -> nn.Module:
    """The UNet cast per `config`, made once per (weights, config); one copy is kept per UNet (in the registry)."""
    art = registry.artifacts(unet)
    key = (config.dtype, config.channels_last, weights_token(unet))
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


__all__ = ["cast_copy_for", "clear_caches", "cache_state"]
