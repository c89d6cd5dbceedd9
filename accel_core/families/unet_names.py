"""The UNet layer-name table (LDM <-> diffusers) and the UNets' LoRA name map.

Derived from the module's own block structure, so it follows whatever the host built. The
two UNet registrations (families/ldm.py, families/diffusers.py) hand `unet_lora_keys` to the
registry as their `lora_keys`.
"""
from __future__ import annotations

from torch import nn

LDM = "ldm"
DIFFUSERS = "diffusers"

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
        # Which scheme is the host's: the module's own structure says (only the two UNet families use this table).
        self.kind = LDM if hasattr(unet, "input_blocks") else DIFFUSERS if hasattr(unet, "down_blocks") else None
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


def unet_lora_keys(unet: nn.Module) -> dict[str, tuple[str, None]]:
    """Every name a LoRA file may use for each weight of a UNet -> (that weight's parameter name, None)."""
    names = UNetNames(unet)
    keys: dict[str, tuple[str, None]] = {}
    for mname, mod in unet.named_modules():
        w = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
        if w is None:  # norms too: ComfyUI maps their names for `.diff` / LoRA patches
            continue
        pname = f"{mname}.weight"
        clean = mname.replace(".base_layer", "")  # PEFT-injected diffusers layers
        aliases = {clean}
        other = names.other(clean)
        if other:
            aliases.add(other)
        alt = _BASIC_ALT.get(names.ldm_name(clean) or "")
        if alt:
            aliases.add(alt)
        diff = names.diffusers_name(clean)
        if diff and ".to_" in diff:  # old diffusers attention-processor names
            proc = diff.replace(".to_", ".processor.to_")
            aliases.add(proc[:-2] if proc.endswith(".to_out.0") else proc)
        for a in aliases:
            keys[a] = (pname, None)
    return keys


__all__ = ["UNetNames", "unet_lora_keys", "LDM", "DIFFUSERS"]
