"""Recognise the UNets the core knows and name their compile units.

Two families share most of the pack's logic:
- "ldm": the CompVis/LDM `UNetModel` (ComfyUI's `comfy.ldm...openaimodel.UNetModel` and the
  A1111 webui's `ldm.modules.diffusionmodules.openaimodel.UNetModel`): input_blocks,
  middle_block, output_blocks, time_embed, out.
- "diffusers": `UNet2DConditionModel`: conv_in, time_embedding, down_blocks, mid_block,
  up_blocks, conv_norm_out, conv_out.

One forward walk per family, for DeepCache's cut runs: `unet.ldm` (ComfyUI, A1111, Forge,
host differences through a hooks object) and `unet.diffusers`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SDAccelError

LDM = "ldm"
DIFFUSERS = "diffusers"


def unet_kind(module) -> str | None:
    """'ldm', 'diffusers' or None for a module the core does not know."""
    if not isinstance(module, nn.Module):
        return None
    if all(hasattr(module, a) for a in ("input_blocks", "middle_block", "output_blocks", "out", "time_embed")):
        return LDM
    if all(hasattr(module, a) for a in ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out")):
        return DIFFUSERS
    return None


def skip_count(unet) -> int:
    """How many skip connections (DeepCache's possible cut depths) a UNet has."""
    kind = unet_kind(unet)
    if kind == LDM:
        return len(unet.input_blocks)
    if kind == DIFFUSERS:
        return 1 + sum(len(b.resnets) + (1 if getattr(b, "downsamplers", None) else 0) for b in unet.down_blocks)
    raise SDAccelError(f"SD Accel: expected an SD UNet (ComfyUI/LDM UNetModel or diffusers UNet2DConditionModel), found {type(unet).__name__}. "
                       "SD Accel supports SD1.x, SD2.x and SDXL UNets.")


def describe(module) -> str:
    kind = unet_kind(module)
    if kind is None:
        return type(module).__name__
    p = next(module.parameters(), None)
    where = f"{p.dtype}, {p.device}" if p is not None else "no parameters"
    return f"{type(module).__name__} ({kind}, {sum(x.numel() for x in module.parameters()) / 1e6:.1f}M params, {where})"


def _flatten(prefix: str, module: nn.Module):
    # Containers (ModuleList, Sequential, TimestepEmbedSequential) are not called as units:
    # their host iterates them, so a unit is each of their children.
    if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0:
        for i, child in enumerate(module):
            yield from _flatten(f"{prefix}.{i}", child)
    else:
        yield prefix, module


def compile_units(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The submodules to compile one by one when the whole UNet cannot be compiled.

    Each unit is a module its host calls through `module(...)`, so replacing its `forward`
    for the duration of a call is enough to route it through a compiled callable.
    """
    kind = unet_kind(module)
    if kind == LDM:
        names = ["time_embed", "label_emb", "input_blocks", "middle_block", "output_blocks", "out"]
    elif kind == DIFFUSERS:
        names = ["time_embedding", "add_embedding", "conv_in", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_out"]
    else:
        names = [n for n, _ in module.named_children()]
    units = []
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            units.extend(_flatten(name, child))
    return [(n, m) for n, m in units if any(True for _ in m.parameters()) or len(list(m.children()))]


def split_unit(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children of a unit that failed to compile, to try one level finer."""
    out = []
    for child_name, child in module.named_children():
        out.extend(_flatten(f"{name}.{child_name}", child))
    return [(n, m) for n, m in out if any(True for _ in m.parameters())]


@dataclass
class ModuleDtype:
    dtype: torch.dtype
    device: torch.device


def module_dtype(module: nn.Module) -> ModuleDtype:
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    if p is None:
        return ModuleDtype(torch.float32, torch.device("cpu"))
    return ModuleDtype(p.dtype, p.device)
