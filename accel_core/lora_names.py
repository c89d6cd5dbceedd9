"""Layer names for LoRA keys, and the match of a file's layers to a model's weights.

Every parameter a weight patch may change answers to its own module path
(`double_blocks.0.img_attn.qkv`; any of the prefixes `lora_file.UNET_PREFIXES` strips; dots
or kohya underscores). On top of that come the names of the model family's LoRA name map
(`Family.lora_keys`, families/): the UNets' LDM <-> diffusers table, the DiT families' diffusers
/ XLabs names, which may point at a slice of a fused weight (`(dim, start, size)`: diffusers'
to_q/to_k/to_v on ComfyUI's Flux qkv), the way ComfyUI's `model_lora_keys_unet` does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .families import families, family_of
from .families.unet_names import UNetNames
from .lora_file import UNET_PREFIXES, DiffLayer, LoraFile, LoraLayer

def _patchable(unet: nn.Module):
    """(name, parameter) of every parameter a weight patch may change: those of modules without
    parameters below them (ComfyUI's ModelPatcher patches no others, e.g. not Wan's `blocks.N.modulation`)."""
    for mname, mod in unet.named_modules():
        own = list(mod.named_parameters(recurse=False))
        if own and not any(True for c in mod.children() for _ in c.parameters()):
            for n, p in own:
                yield (f"{mname}.{n}" if mname else n), p


_UNETS = "SD1.x/SD2.x/SDXL UNet"


def _family_map(module: nn.Module):
    """(the module's Family or None, its LoRA name map {alias: (parameter, offset)} or None)."""
    fam = family_of(module)
    if fam is None:
        return None, None
    return fam, (fam.lora_keys(module) if fam.lora_keys is not None else None)


def _group(fam) -> str | None:
    """The family's name, the UNets (LDM and diffusers) as one: "unet"."""
    return None if fam is None else "unet" if fam.skip_count is not None else fam.name


def display(group: str | None) -> str:
    if group == "unet":
        return _UNETS
    return next((f.display for f in families() if f.name == group), group or "unknown")


class Targets:
    """Every name a LoRA file may use for each weight of one model -> (parameter name, offset)."""

    def __init__(self, unet: nn.Module):
        self.names = UNetNames(unet)
        fam, family_keys = _family_map(unet)
        self.group = _group(fam)
        self.exact: dict[str, tuple[str, object]] = {}
        self.flat: dict[str, tuple[str, object]] = {}
        self.shapes: dict[str, torch.Size] = {}
        for pname, w in _patchable(unet):
            self.shapes[pname] = w.shape
            own = pname[: -len(".weight")] if pname.endswith(".weight") else pname  # bare parameters: their own name
            self._add(own.replace(".base_layer", ""), pname)  # .base_layer: PEFT-injected diffusers layers
        for alias, (pname, offset) in (family_keys or {}).items():
            if pname in self.shapes:
                self._add(alias, pname, offset, keep=True)

    def _add(self, alias: str, pname: str, offset=None, keep: bool = False):
        for table, key in ((self.exact, alias), (self.flat, alias.replace(".", "_"))):
            if not (keep and key in table):  # a module's own name wins over a family alias spelled the same
                table[key] = (pname, offset)

    def label(self) -> str:
        if self.group != "unet":
            return f"{display(self.group)} model ({len(self.shapes)} weights)"
        ctx = next((s[1] for n, s in self.shapes.items() if n.endswith("attn2.to_k.weight")), None)
        arch = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}.get(ctx, f"cross-attention width {ctx}")
        return f"{arch} UNet ({self.names.kind}, {len(self.shapes)} weights)"

    def lookup(self, base: str) -> tuple[str, object] | None:
        changed = True
        while changed:  # prefixes may nest: base_model.model.unet....
            changed = False
            for p in UNET_PREFIXES:
                if base.startswith(p):
                    base, changed = base[len(p):], True
                    break
        return self.exact.get(base) or self.flat.get(base.replace(".", "_"))


def guess_family(keys) -> str | None:
    """The family group (a registry name, or "unet") a LoRA's layer names point to (the families'
    `lora_hints`: key fragments that say which family a file was made for), or None. A tie goes to
    the family registered first (the UNets: an SD LoRA also names attn1/attn2 layers)."""
    hints = [(_group(f), f.lora_hints) for f in families() if f.lora_hints]
    votes = {}
    for k in keys:
        for fam, frags in hints:
            if any(f in k for f in frags):
                votes[fam] = votes.get(fam, 0) + 1
    return max(votes, key=votes.get) if votes else None


@dataclass
class Resolved:
    """A file's layers placed on one model: parameter -> [(layer, offset), ...]."""

    by_param: dict[str, list[tuple[LoraLayer | DiffLayer, object]]]
    matched: int
    total: int
    unmatched: list[str]
    wrong_shape: list[tuple[str, tuple, tuple]]


def _fits(layer, shape) -> tuple[bool, tuple]:
    if isinstance(layer, DiffLayer):
        return layer.diff.numel() == shape.numel() and layer.diff.shape[0] == shape[0], tuple(layer.diff.shape)
    in_numel = layer.down[0].numel() if layer.mid is None else layer.down.shape[1] * layer.mid[0, 0].numel()
    return layer.up.shape[0] == shape[0] and in_numel == shape[1:].numel(), (layer.up.shape[0], in_numel)


def resolve_lora(lf: LoraFile, targets: Targets) -> Resolved:
    by_param, unmatched, wrong = {}, [], []
    matched = 0
    for key, layer in lf.layers.items():
        hit = targets.lookup(layer.base)
        if hit is not None and isinstance(layer, DiffLayer) and layer.bias:
            pname, offset = hit
            bias = pname[: -len(".weight")] + ".bias" if pname.endswith(".weight") and offset is None else None
            hit = (bias, None) if bias in targets.shapes else None
        if hit is None:
            unmatched.append(key)
            continue
        pname, offset = hit
        shape = targets.shapes[pname]
        if isinstance(offset, tuple):
            dim, _, size = offset
            shape = torch.Size(size if d == dim else n for d, n in enumerate(shape))
        ok, got = _fits(layer, shape)
        if not ok:
            wrong.append((key, got, tuple(shape)))
            continue
        by_param.setdefault(pname, []).append((layer, offset))
        matched += 1
    return Resolved(by_param, matched, len(lf.layers), unmatched, wrong)
