"""Z-Image and Lumina 2 (ComfyUI's `comfy/ldm/lumina` `NextDiT`; Z-Image is NextDiT with
`z_image_modulation`).

The main `layers` (30 on Z-Image) run after the context refiner (2 blocks on the text tokens,
no timestep) and the noise refiner (2 blocks on the image tokens), all `JointTransformerBlock`s
called as `block(x, mask, freqs_cis[, adaln_input], [timestep_zero_index=...,] transformer_options=...)`.
ComfyUI's NextDiT offers no `patches_replace["dit"]` hook for them (read in 0.3.64, 0.8.0,
0.33.0 and up to 0.38), so the lists are `hooked=False`: a ComfyUI clone gets a `BlockHook` in
place of each block (families/hooks.py), named after the names NextDiT itself uses for its
post-block patches ("double_block", "noise_refiner") and after the context refiner. The Step
Cache cuts only `layers` (the refiners run once per call on their own tokens). Hosts without
module replacement compile `_forward` whole, with the `units` as the fallback.
"""
from __future__ import annotations

from .base import BlockList, Family, register, units_of
from ._dit import probe
from . import zimage_lora

_PARTS = ("x_embedder", "t_embedder", "cap_embedder", "noise_refiner", "context_refiner", "layers", "final_layer")
_ARGS = ("img", "mask", "pe", "vec")

ZIMAGE = register(Family(
    name="zimage", display="Z-Image / Lumina 2 (NextDiT)",
    probe=probe(("NextDiT",), "layers", "noise_refiner", "context_refiner"),
    entry=("_forward", "forward"),
    lora_keys=zimage_lora.lora_keys,
    blocks=(BlockList("context_refiner", "context_refiner", hooked=False, args=_ARGS, cut=False),
            BlockList("noise_refiner", "noise_refiner", hooked=False, args=_ARGS, cut=False),
            BlockList("layers", "double_block", hooked=False, args=_ARGS)),
    units=lambda m: units_of(m, _PARTS),
    fp8_skip=("t_embedder", "adaLN_modulation"),
    lora_hints=("noise_refiner", "context_refiner", "attention.qkv", "attention_qkv", "feed_forward.w", "feed_forward_w"),
))
