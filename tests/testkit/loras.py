"""Seeded random LoRAs in the real key formats (kohya LDM and diffusers names, PEFT, old diffusers
attention processors), keyed as trainers write them, for the LoRA tests of every host."""
from __future__ import annotations

import torch
from torch import nn

from sd_accel.accel_core.errors import choice_error
from sd_accel.accel_core.lora_names import UNetNames

# The key suffixes of each format, as the files on the hub have them (up / down, alpha).
_KOHYA = (".lora_up.weight", ".lora_down.weight")
_PEFT = (".lora_B.weight", ".lora_A.weight")
_OLD_DIFFUSERS = ("_lora.up.weight", "_lora.down.weight")
ALPHA_SUFFIX = ".alpha"

FORMATS = ("kohya-ldm", "kohya-diffusers", "peft", "diffusers-old")


def make_random_lora(unet: nn.Module, fmt: str = "kohya-ldm", rank: int = 4, seed: int = 0, scope: str = "attn",
                     magnitude: float = 0.5, alpha: float | None = None, dtype=torch.float16, with_text_encoder: bool = True) -> dict[str, torch.Tensor]:
    """A LoRA state dict for `unet` with seeded random low-rank weights, keyed in one of the real formats.

    scope: "attn" (attention projections, proj_in/out, feed-forward) or "all" (plus ResBlock convs).
    Each delta has roughly `magnitude` times the norm of the weight it changes.
    """
    if fmt not in FORMATS:
        raise choice_error("LoRA format", fmt, FORMATS)
    names = UNetNames(unet)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for mname, mod in unet.named_modules():
        w = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
        if w is None or w.dim() < 2:
            continue
        diff = names.diffusers_name(mname)
        if diff is None:
            continue
        leaf = diff.rsplit(".", 1)[-1]
        attn = "attentions" in diff and ".norm" not in diff
        if not (attn or (scope == "all" and leaf in ("conv1", "conv2", "time_emb_proj"))):
            continue
        r = min(rank, w.shape[0], w[0].numel())
        down = torch.randn((r, *w.shape[1:]), generator=g) / w[0].numel() ** 0.5
        up = torch.randn((w.shape[0], r) + (1,) * (w.dim() - 2), generator=g)
        a = float(alpha if alpha is not None else r)
        est = (up.flatten(1) @ down.flatten(1)).norm() * (a / r)
        wn = 1.0 if w.is_meta else float(w.detach().float().norm())  # meta: shapes only (architecture checks)
        up *= magnitude * wn / float(est.clamp_min(1e-12))
        if fmt == "diffusers-old" and ".to_" not in diff:
            continue  # that format had attention projections only (drawn anyway: same seed, same deltas)
        if fmt == "kohya-ldm":
            base, pair = "lora_unet_" + names.ldm_name(mname).replace(".", "_"), _KOHYA
        elif fmt == "kohya-diffusers":
            base, pair = "lora_unet_" + diff.replace(".", "_"), _KOHYA
        elif fmt == "peft":
            base, pair = "unet." + diff, _PEFT
        else:
            proc = diff.replace(".to_", ".processor.to_")
            base, pair = "unet." + (proc[:-2] if proc.endswith(".to_out.0") else proc), _OLD_DIFFUSERS
        out[base + pair[0]] = up.to(dtype)
        out[base + pair[1]] = down.to(dtype)
        if fmt.startswith("kohya"):
            out[base + ALPHA_SUFFIX] = torch.tensor(a)
    if with_text_encoder:
        te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj" if fmt.startswith("kohya") else "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
        p = _KOHYA if fmt.startswith("kohya") else _PEFT
        out[te + p[0]] = torch.randn(768, rank, generator=g).to(dtype)
        out[te + p[1]] = torch.randn(rank, 768, generator=g).to(dtype)
    return out


__all__ = ["FORMATS", "make_random_lora"]
