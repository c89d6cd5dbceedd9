"""Per-model attention choice on ComfyUI: transformer_options["optimized_attention_override"]
(ComfyUI >= 0.3.6x) is called instead of the attention function the host picked at start-up,
for this model only. FP16 Cast installs `attention_override` with its kernel choice.
"""
from __future__ import annotations

import torch

from ...casting import attention_context

OVERRIDE_KEY = "optimized_attention_override"


def attention_override(attention: str, func, *args, **kwargs):
    from comfy.ldm.modules.attention import attention_pytorch

    if attention == "auto":
        return attention_pytorch(*args, **kwargs)
    # ComfyUI's attention_pytorch opens its own sdpa_kernel(priority) around SDPA on CUDA, which
    # would undo the choice: call SDPA here, shaped as attention_pytorch shapes it.
    return sdpa(attention, *args, **kwargs)


def sdpa(attention, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, inner = q.shape
        dim_head = inner // heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
        mask = mask.unsqueeze(1) if mask.ndim == 3 else mask
    extra = {"scale": kwargs["scale"]} if "scale" in kwargs else {}
    with attention_context(attention):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, **extra)
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(b, -1, heads * dim_head)
    return out


__all__ = ["attention_override", "sdpa", "OVERRIDE_KEY"]
