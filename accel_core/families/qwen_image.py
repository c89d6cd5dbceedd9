"""Qwen-Image (ComfyUI's `comfy/ldm/qwen_image` `QwenImageTransformer2DModel`; also its edit models).

60 identical dual-stream blocks (`transformer_blocks`), each offered to
`patches_replace["dit"][("double_block", i)]` (img, txt, vec, pe, transformer_options).
"""
from __future__ import annotations

from .base import BlockList, Family, register
from ._dit import probe
from .lora_maps import own_names

QWEN_IMAGE = register(Family(
    name="qwen_image", display="Qwen-Image (DiT)",
    probe=probe(("QwenImageTransformer2DModel",), "transformer_blocks"),
    entry=("_forward", "forward"),
    lora_keys=own_names,
    blocks=(BlockList("transformer_blocks", "double_block"),),
    lora_hints=("img_mlp.net", "img_mlp_net", "img_mod.1", "img_mod_1", "txt_mlp.net", "txt_mlp_net"),
    fp8_skip=("time_text_embed", "img_mod", "txt_mod", "norm_out"),
))
