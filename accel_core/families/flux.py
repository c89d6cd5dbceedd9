"""Flux (Flux.1 dev/schnell, Flux.2, Kontext: ComfyUI's `comfy/ldm/flux` `Flux`) and Chroma
(`comfy/ldm/chroma`, the same double/single stream blocks). Forge Neo's `backend/nn/flux.py` and
`chroma.py` (`IntegratedFluxTransformer2DModel`, `IntegratedChromaTransformer2DModel`) are
ComfyUI-derived: same block lists, parameter names and `patches_replace["dit"]` hooks.

The forward runs 19 double-stream blocks (image and text streams apart) then 38 single-stream
blocks (one joint stream) on Flux.1-dev; each block i is offered to
`patches_replace["dit"][("double_block", i)]` / `[("single_block", i)]` with its inputs
(img, txt, vec, pe, attn_mask, transformer_options) and the original block.
"""
from __future__ import annotations

from .base import BlockList, Family, register
from ._dit import probe
from . import flux_lora

FLUX = register(Family(
    name="flux", display="Flux / Chroma (DiT)",
    probe=probe(("Flux", "Chroma", "ChromaRadiance", "IntegratedFluxTransformer2DModel", "IntegratedChromaTransformer2DModel"), "double_blocks", "single_blocks"),
    entry=("_forward", "forward"),
    lora_keys=flux_lora.lora_keys,
    blocks=(BlockList("double_blocks", "double_block"), BlockList("single_blocks", "single_block")),
    lora_hints=("double_blocks", "single_blocks", "single_transformer_blocks", "qkv_lora"),
    fp8_skip=("time_in", "vector_in", "guidance_in", "distilled_guidance", "img_mod", "txt_mod", "modulation", "adaLN"),
))
