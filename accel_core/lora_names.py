"""Layer names for LoRA keys, and the match of a file's layers to a model's weights.

Every parameter answers to its own module path (`double_blocks.0.img_attn.qkv`, any of the
prefixes `lora_file._UNET_PREFIXES` strips, dots or kohya underscores). On top of that:
- SD UNets: the diffusers <-> LDM name table, derived from the module's own block structure
  (so it follows whatever the host built);
- DiT families: the family's LoRA name map (`families.<family>_lora.lora_aliases`), which may
  point a name at a slice of a fused weight (`(dim, start, size)`: diffusers' to_q/to_k/to_v on
  ComfyUI's Flux qkv) the way ComfyUI's `model_lora_keys_unet` does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .lora_file import _UNET_PREFIXES, DiffLayer, LoraFile, LoraLayer
from .unet import DIFFUSERS, LDM, unet_kind

# --- UNet names: LDM <-> diffusers -------------------------------------------------------------

_RES_SUB = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
            "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_SUB = {"res": _RES_SUB, "down": {"op": "conv"}, "up": {"conv": "conv"}}
_BASIC = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
          "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
          "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_BASIC_ALT = {"label_emb.0.0": "class_embedding.linear_1", "label_emb.0.2": "class_embedding.linear_2"}  # SD2 unCLIP names


def _is_res(m):
    return hasattr(m, "in_layers") and hasattr(m, "out_layers")


def _is_attn(m):
    return hasattr(m, "transformer_blocks")


def _is_down(m):
    return hasattr(m, "op") and not _is_res(m)


def _is_up(m):
    return "upsample" in type(m).__name__.lower() and hasattr(m, "conv")


def _block_pairs_ldm(unet) -> list[tuple[str, str, str]]:
    pairs = []
    level = i = 0
    for n in range(1, len(unet.input_blocks)):
        block = unet.input_blocks[n]
        if _is_down(block[0]):
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{level}.downsamplers.0", "down"))
            level, i = level + 1, 0
            continue
        for c, child in enumerate(block):
            if _is_res(child):
                pairs.append((f"input_blocks.{n}.{c}", f"down_blocks.{level}.resnets.{i}", "res"))
            elif _is_attn(child):
                pairs.append((f"input_blocks.{n}.{c}", f"down_blocks.{level}.attentions.{i}", "attn"))
        i += 1
    r = 0
    for c, child in enumerate(unet.middle_block or []):
        if _is_res(child):
            pairs.append((f"middle_block.{c}", f"mid_block.resnets.{r}", "res"))
            r += 1
        elif _is_attn(child):
            pairs.append((f"middle_block.{c}", "mid_block.attentions.0", "attn"))
    level = i = 0
    for n, block in enumerate(unet.output_blocks):
        upsampled = False
        for c, child in enumerate(block):
            if _is_res(child):
                pairs.append((f"output_blocks.{n}.{c}", f"up_blocks.{level}.resnets.{i}", "res"))
            elif _is_attn(child):
                pairs.append((f"output_blocks.{n}.{c}", f"up_blocks.{level}.attentions.{i}", "attn"))
            elif _is_up(child):
                pairs.append((f"output_blocks.{n}.{c}", f"up_blocks.{level}.upsamplers.0", "up"))
                upsampled = True
        i += 1
        if upsampled:
            level, i = level + 1, 0
    return pairs


def _block_pairs_diffusers(unet) -> list[tuple[str, str, str]]:
    pairs = []
    n = 1
    for x, block in enumerate(unet.down_blocks):
        attns = getattr(block, "attentions", None)
        for i in range(len(block.resnets)):
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{x}.resnets.{i}", "res"))
            if attns is not None and i < len(attns):
                pairs.append((f"input_blocks.{n}.1", f"down_blocks.{x}.attentions.{i}", "attn"))
            n += 1
        if getattr(block, "downsamplers", None):
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{x}.downsamplers.0", "down"))
            n += 1
    mid = unet.mid_block
    if mid is not None:
        has_attn = bool(getattr(mid, "attentions", None))
        pairs.append(("middle_block.0", "mid_block.resnets.0", "res"))
        if has_attn:
            pairs.append(("middle_block.1", "mid_block.attentions.0", "attn"))
        for r in range(1, len(mid.resnets)):
            pairs.append((f"middle_block.{r + (1 if has_attn else 0)}", f"mid_block.resnets.{r}", "res"))
    n = 0
    for x, block in enumerate(unet.up_blocks):
        attns = getattr(block, "attentions", None)
        for i in range(len(block.resnets)):
            pairs.append((f"output_blocks.{n}.0", f"up_blocks.{x}.resnets.{i}", "res"))
            has_attn = attns is not None and i < len(attns)
            if has_attn:
                pairs.append((f"output_blocks.{n}.1", f"up_blocks.{x}.attentions.{i}", "attn"))
            if i == len(block.resnets) - 1 and getattr(block, "upsamplers", None):
                pairs.append((f"output_blocks.{n}.{2 if has_attn else 1}", f"up_blocks.{x}.upsamplers.0", "up"))
            n += 1
    return pairs


class UNetNames:
    """Module-name translation between the host's UNet and the other naming scheme."""

    def __init__(self, unet: nn.Module):
        self.kind = unet_kind(unet)
        if self.kind == LDM:
            pairs = _block_pairs_ldm(unet)
            self._blocks = {ldm: (diff, kind) for ldm, diff, kind in pairs}
            self._basic = dict(_BASIC)
            self._subs = _SUB
        elif self.kind == DIFFUSERS:
            pairs = _block_pairs_diffusers(unet)
            self._blocks = {diff: (ldm, kind) for ldm, diff, kind in pairs}
            self._basic = {v: k for k, v in _BASIC.items()}
            self._subs = {k: {v: s for s, v in m.items()} for k, m in _SUB.items()}
        else:
            self._blocks, self._basic, self._subs = {}, {}, {}

    def other(self, name: str) -> str | None:
        """`name` (a module path in the host's scheme) in the other scheme, or None."""
        if name in self._basic:
            return self._basic[name]
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            hit = self._blocks.get(prefix)
            if hit is None:
                continue
            other, kind = hit
            rest = ".".join(parts[cut:])
            if kind == "attn":
                return f"{other}.{rest}"
            sub = self._subs[kind].get(rest)
            return f"{other}.{sub}" if sub is not None else None
        return None

    def diffusers_name(self, name: str) -> str | None:
        return name if self.kind == DIFFUSERS else self.other(name)

    def ldm_name(self, name: str) -> str | None:
        return name if self.kind == LDM else self.other(name)


def _patchable(unet: nn.Module):
    """(name, parameter) of every parameter a weight patch may change: those of modules without
    parameters below them (ComfyUI's ModelPatcher patches no others, e.g. not Wan's `blocks.N.modulation`)."""
    for mname, mod in unet.named_modules():
        own = list(mod.named_parameters(recurse=False))
        if own and not any(True for c in mod.children() for _ in c.parameters()):
            for n, p in own:
                yield (f"{mname}.{n}" if mname else n), p


def _family_map(module: nn.Module):
    """(family label, its LoRA name map or None) for a DiT the core knows, else (None, None)."""
    from .families import lora_maps

    return lora_maps.for_module(module)


class _Targets:
    """Every name a LoRA file may use for each weight of one model -> (parameter name, offset)."""

    def __init__(self, unet: nn.Module):
        self.names = UNetNames(unet)
        self.family, family_map = _family_map(unet) if self.names.kind is None else (None, None)
        self.exact: dict[str, tuple[str, object]] = {}
        self.flat: dict[str, tuple[str, object]] = {}
        self.shapes: dict[str, torch.Size] = {}
        for pname, w in _patchable(unet):
            self.shapes[pname] = w.shape
            if not pname.endswith(".weight"):
                self._add(pname.replace(".base_layer", ""), pname)  # bare parameters (Wan's modulation): their own name
                continue
            mname = pname[: -len(".weight")]
            clean = mname.replace(".base_layer", "")  # PEFT-injected diffusers layers
            aliases = {clean}
            if w.dim() >= 2:
                other = self.names.other(clean)
                if other:
                    aliases.add(other)
                alt = _BASIC_ALT.get(self.names.ldm_name(clean) or "")
                if alt:
                    aliases.add(alt)
                diff = self.names.diffusers_name(clean)
                if diff and ".to_" in diff:  # old diffusers attention-processor names
                    proc = diff.replace(".to_", ".processor.to_")
                    aliases.add(proc[:-2] if proc.endswith(".to_out.0") else proc)
            for a in aliases:
                self._add(a, pname)
        if family_map is not None:
            for alias, pname, offset in family_map(unet):
                if pname in self.shapes:
                    self._add(alias, pname, offset, keep=True)

    def _add(self, alias: str, pname: str, offset=None, keep: bool = False):
        for table, key in ((self.exact, alias), (self.flat, alias.replace(".", "_"))):
            if not (keep and key in table):  # a module's own name wins over a family alias spelled the same
                table[key] = (pname, offset)

    @property
    def family_name(self) -> str:
        return self.family or _FAMILY_HINTS[0][0]

    def label(self) -> str:
        if self.family:
            return f"{self.family} model ({len(self.shapes)} weights)"
        ctx = next((s[1] for n, s in self.shapes.items() if n.endswith("attn2.to_k.weight")), None)
        arch = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}.get(ctx, f"cross-attention width {ctx}")
        return f"{arch} UNet ({self.names.kind}, {len(self.shapes)} weights)"

    def lookup(self, base: str) -> tuple[str, object] | None:
        changed = True
        while changed:  # prefixes may nest: base_model.model.unet....
            changed = False
            for p in _UNET_PREFIXES:
                if base.startswith(p):
                    base, changed = base[len(p):], True
                    break
        return self.exact.get(base) or self.flat.get(base.replace(".", "_"))


# Key fragments that say which family a LoRA file was made for (for the wrong-model message).
_FAMILY_HINTS = (
    ("SD1.x/SD2.x/SDXL UNet", ("input_blocks", "output_blocks", "down_blocks", "up_blocks", "mid_block", "middle_block")),
    ("Flux", ("double_blocks", "single_blocks", "single_transformer_blocks", "qkv_lora")),
    ("Qwen-Image", ("img_mlp.net", "img_mlp_net", "img_mod.1", "img_mod_1", "txt_mlp.net", "txt_mlp_net")),
    ("Wan", ("self_attn.q", "self_attn_q", "cross_attn.k", "cross_attn_k", "blocks.0.ffn", "blocks_0_ffn")),
    ("Z-Image / Lumina 2", ("noise_refiner", "context_refiner", "attention.qkv", "attention_qkv", "feed_forward.w", "feed_forward_w")),
)


def guess_family(keys) -> str | None:
    """The model family a LoRA's layer names point to, or None."""
    votes = {}
    for k in keys:
        for fam, frags in _FAMILY_HINTS:
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


def _resolve(lf: LoraFile, targets: _Targets) -> Resolved:
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
