"""The match of a LoRA file's layers to a model's weights, through its family's LoRA name map
(families/: the UNets' LDM <-> diffusers table, the DiT families' maps).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .lora_file import _UNET_PREFIXES, LoraFile, LoraLayer
from .families import family_of
from .families.unet_names import UNetNames


class _Targets:
    """Every name a LoRA file may use for each weight of one model -> that weight's parameter name.

    The names come from the model family's LoRA name map (families/); a model of no known
    family matches by its own layer names.
    """

    def __init__(self, unet: nn.Module):
        fam = family_of(unet)
        self.kind = fam.name if fam is not None else None
        self.label = fam.display if fam is not None else type(unet).__name__
        keys = fam.lora_keys(unet) if fam is not None and fam.lora_keys is not None else _own_keys(unet)
        self.exact: dict[str, str] = {}
        self.flat: dict[str, str] = {}
        self.slices: dict[str, tuple] = {}  # LoRA name -> (dim, start, size) of a fused weight it targets
        self.shapes: dict[str, torch.Size] = {}
        params = dict(unet.named_parameters())
        for alias, (pname, sl) in keys.items():
            if pname not in params:
                continue
            self.shapes[pname] = params[pname].shape
            self.exact[alias] = pname
            self.flat[alias.replace(".", "_")] = pname
            if sl is not None:
                self.slices[alias] = self.slices[alias.replace(".", "_")] = sl

    def lookup(self, base: str) -> str | None:
        changed = True
        while changed:  # prefixes may nest: base_model.model.unet....
            changed = False
            for p in _UNET_PREFIXES:
                if base.startswith(p):
                    base, changed = base[len(p):], True
        return self.exact.get(base) or self.flat.get(base.replace(".", "_"))


@dataclass
class Resolved:
    """A file's layers placed on one UNet."""

    by_param: dict[str, LoraLayer]
    matched: int
    total: int
    unmatched: list[str]
    wrong_shape: list[tuple[str, tuple, tuple]]


def _own_keys(module: nn.Module) -> dict[str, tuple[str, None]]:
    return {n: (f"{n}.weight", None) for n, m in module.named_modules() if getattr(m, "weight", None) is not None and m.weight.dim() >= 2}


def _resolve(lf: LoraFile, targets: _Targets) -> Resolved:
    by_param, unmatched, wrong = {}, [], []
    for base, layer in lf.layers.items():
        pname = targets.lookup(base)
        if pname is None:
            unmatched.append(base)
            continue
        shape = targets.shapes[pname]
        out_ok = layer.up.shape[0] == shape[0]
        in_numel = layer.down[0].numel() if layer.mid is None else layer.down.shape[1] * layer.mid[0, 0].numel()
        if not out_ok or in_numel != shape[1:].numel():
            wrong.append((base, (layer.up.shape[0], in_numel), tuple(shape)))
            continue
        by_param[pname] = layer
    return Resolved(by_param, len(by_param), len(lf.layers), unmatched, wrong)
