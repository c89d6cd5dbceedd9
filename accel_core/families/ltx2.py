"""LTX-2 (ComfyUI's `comfy/ldm/lightricks/av_model.py` `LTXAVModel`, 0.8.0+): joint video + audio.

N identical `BasicAVTransformerBlock`s, each a video and an audio transformer (self-attention,
cross-attention to the text, gated MLP) joined by audio-to-video and video-to-audio
cross-attention. Block i is offered to `patches_replace["dit"][("double_block", i)]` with
img = (video, audio) tokens, a pair, and returns img as a pair (read in 0.8.0 and 0.33.0); the
step cache keeps residuals per element of such a pair. The timesteps are `CompressedTimestep`
objects (0.33: a tensor per frame, expanded inside the block) or tensors (0.8.0). A block adds
its residuals into its inputs in place; the step cache copies what it keeps.

LTX-2.3 is this class with options its file's metadata config turns on (read by ComfyUI 0.33's detection):
`apply_gated_attention` (every attention gets `to_gate_logits`, a per-head gate on its output) and
`cross_attention_adaln` (the text cross-attention modulated by 3 more rows of the timestep modulation and by the
`prompt_adaln_single` embeddings, handed to the blocks as v_/a_prompt_timestep). Same blocks, same hook: one
compiled frame; nothing new is fp32.

Per-call switches the blocks read from transformer_options (run_vx / run_ax, a2v_cross_attn /
v2a_cross_attn: ComfyUI's modality guidance; stg_skip_self_attn: its STG guidance, set per block)
reach a compiled block: `block_options` names them.

LoRA names: ComfyUI's module names (`transformer_blocks.0.audio_attn1.to_q`), which 0.33 also
maps bare (comfy/lora.py: LTXV and LTXAV); `lora_names` adds the usual prefixes. The model
builds nothing fp32 (the text connectors' double-precision RoPE is computed, not stored).
"""
from __future__ import annotations

from .base import BlockList, Family, register
from ._dit import probe
from .lora_maps import own_names
from .ltx import LTX

LTX2 = register(Family(
    name="ltx2", display="LTX-2 (audio-video DiT)",
    probe=probe(("LTXAVModel",), "transformer_blocks", "patchify_proj", "audio_patchify_proj", "audio_adaln_single"),
    entry=("_forward", "forward"),
    lora_keys=own_names,
    blocks=(BlockList("transformer_blocks", "double_block"),),
    block_options=("stg_skip_self_attn", "run_vx", "run_ax", "a2v_cross_attn", "v2a_cross_attn"),
    # Every timestep modulation: adaln_single, audio_adaln_single, the av_ca_*_adaln_single of the
    # audio-video cross-attention and LTX-2.3's prompt_adaln_single pair (one row per frame, steer every block);
    # LTX-2.3's per-head gates (to_gate_logits: one logit per head, a matmul 1/128 of a projection whose
    # activation would be quantized for nothing); the text connectors (run once per sampling run).
    fp8_skip=("adaln_single", "to_gate_logits", "embeddings_connector"),
    # LTX-Video's hints (an LTX-2 file names the same video layers; a tie goes to LTX-Video, registered
    # first) and the audio layers only LTX-2 has.
    lora_hints=LTX.lora_hints + ("audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn", "audio_ff", "audio_patchify"),
))
