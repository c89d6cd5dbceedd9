"""MiniMax H3 (ComfyUI's `comfy/ldm/minimax` `MiniMaxH3Model`, 0.33+): joint video + audio generation.

Text, audio and video rows are packed into one sequence (`PackedLayout`); 50 identical `DiTBlock`s
run over it, each offered to `patches_replace["dit"][("double_block", i)]` with (img: the packed
rows [S, hidden], t_emb, mod_segments, rope_freqs, transformer_options). A block adds its gated
residuals into its input in place; the step cache copies what it keeps. The token refiner runs on
the text once per sampling run (model_base's extra_conds), so it is not a compile unit.

Parts the class builds fp32 and feeds fp32 (the patch projections, the time embedder, the output
heads, the RoPE frequencies; and, in the curve-form checkpoints that ship `adaln_t_table`, every
adaln projection) keep their dtype under a cast and stay out of fp8. ComfyUI maps no LoRA names
of its own for H3: its module paths, with the usual prefixes.
"""
from __future__ import annotations

from .base import BlockList, Family, register
from ._dit import probe
from .lora_maps import own_names

_FP32 = ("video_patch_proj", "audio_patch_proj", "time_embedder", "video_out", "audio_out", "rope", "adaln_t_table")


def _keep_dtype(module) -> tuple[str, ...]:
    return _FP32 + (("adaln_proj",) if getattr(module, "use_adaln_curves", False) else ())


MINIMAX = register(Family(
    name="minimax", display="MiniMax H3 (DiT)",
    probe=probe(("MiniMaxH3Model",), "blocks", "video_patch_proj", "token_refiner"),
    entry=("_forward", "forward"),
    lora_keys=own_names,
    blocks=(BlockList("blocks", "double_block"),),
    keep_dtype=_keep_dtype,
    fp8_skip=_FP32 + ("adaln_proj",),  # adaln_proj: the timestep modulation (a few rows per call), which steers every block
    lora_hints=("qkv_proj", "adaln_proj", "token_refiner", "patch_proj"),
))
