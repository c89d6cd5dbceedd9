"""Wan 2.x (ComfyUI's `comfy/ldm/wan` `WanModel` and its subclasses: T2V/I2V 1.3B/5B/14B, VACE,
camera, S2V; Wan 2.2's 5B and 14B are WanModel configs).

30 (1.3B, 5B) or 40 (14B) identical `WanAttentionBlock`s, each offered to
`patches_replace["dit"][("double_block", i)]` (img, txt, vec, pe, transformer_options).
"""
from __future__ import annotations

from .base import BlockList, Family, register
from ._dit import probe
from .lora_maps import own_names

WAN = register(Family(
    name="wan", display="Wan 2.x (DiT)",
    probe=probe(("WanModel",), "blocks", "patch_embedding"),
    entry=("_forward", "forward"),
    lora_keys=own_names,
    blocks=(BlockList("blocks", "double_block"),),
    lora_hints=("self_attn.q", "self_attn_q", "cross_attn.k", "cross_attn_k", "blocks.0.ffn", "blocks_0_ffn"),
    keep_dtype=("patch_embedding",),  # built fp32 and called as patch_embedding(x.float())
    fp8_skip=("time_embedding", "time_projection"),
))
