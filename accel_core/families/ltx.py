"""LTX-Video (ComfyUI's `comfy/ldm/lightricks` `LTXVModel`: the 2B and 13B 0.9.x models).

28 (2B) or 48 (13B) identical `BasicTransformerBlock`s (self-attention, cross-attention to the T5
text, gated MLP, all steered by one timestep modulation), each offered to
`patches_replace["dit"][("double_block", i)]` with (img, txt, attention_mask, vec, pe,
transformer_options[, self_attention_mask, prompt_timestep]) (read in 0.3.64, 0.8.0, 0.33.0).
A block adds its residuals into its input in place (`x += ...`); the step cache copies what it keeps.

LTX-2 (`LTXAVModel`, av_model.py, a subclass of LTXVModel) hands its blocks a (video, audio) pair
and timestep objects of its own: it is a family of its own (ltx2.py), which this probe excludes.

LoRA names: ComfyUI's module names are the diffusers names inside the blocks (`attn1.to_q`,
`ff.net.0.proj`); ComfyUI maps `diffusion_model.`, kohya `lora_unet_` and (0.33) bare names, and
`lora_names` also strips diffusers' `transformer.` prefix. The model builds nothing fp32.
"""
from __future__ import annotations

from .base import BlockList, Family, register
from ._dit import probe
from .lora_maps import own_names

LTX = register(Family(
    name="ltx", display="LTX-Video (DiT)",
    probe=probe(("LTXVModel",), "transformer_blocks", "patchify_proj", "adaln_single", unless=("LTXAVModel",)),
    entry=("_forward", "forward"),
    lora_keys=own_names,
    blocks=(BlockList("transformer_blocks", "double_block"),),
    fp8_skip=("adaln_single",),  # the timestep -> 6 x dim modulation (and LTX 0.9.8's prompt_adaln_single)
    lora_hints=("attn1.to_", "attn1_to_", "attn2.to_", "attn2_to_", "adaln_single", "patchify_proj"),
))
