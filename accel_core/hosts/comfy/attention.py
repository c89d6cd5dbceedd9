"""Per-model attention choice on ComfyUI: transformer_options["optimized_attention_override"]
(ComfyUI >= 0.3.6x) is called instead of the attention function the host picked at start-up,
for this model only. FP16 Cast installs `attention_override` with its kernel choice; Compile UNet,
PyTorch SDPA where the host picked an attention that a compiled graph would recompile on.
"""
from __future__ import annotations

import torch

from ...casting import attention_context
from ...log import logger

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


def _sdpa_attention(func, *args, **kwargs):
    # transformer_options["optimized_attention_override"] of a compiled clone whose host picked an
    # attention that asks for free memory on every call (sub-quadratic, split: ComfyUI's choice on
    # the CPU). Traced, that probe is guarded on, so the frame recompiles whenever free memory
    # changes; PyTorch's SDPA computes the same attention and compiles cleanly.
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


def _host_attention_name() -> str:
    import comfy.ldm.modules.attention as attn

    return getattr(getattr(attn, "optimized_attention", None), "__name__", "attention")


def _host_attention_probes_memory() -> bool:
    import comfy.ldm.modules.attention as attn

    if not hasattr(attn, "wrap_attn") or not hasattr(attn, "attention_pytorch"):  # no per-model override in this ComfyUI
        return False
    chosen = getattr(attn, "optimized_attention", None)
    return any(chosen is getattr(attn, name, None) for name in ("attention_sub_quad", "attention_split"))


def compile_attention(m):
    """Compile UNet's clone `m` gets PyTorch SDPA where the host's attention would recompile a compiled graph."""
    to = m.model_options.setdefault("transformer_options", {})
    if OVERRIDE_KEY not in to and _host_attention_probes_memory():
        to[OVERRIDE_KEY] = _sdpa_attention  # a user's or FP16 Cast's choice stays
        logger.info("SD Accel Compile UNet: the compiled model uses PyTorch SDPA attention (ComfyUI's %s asks for free memory "
                    "on every call, which a compiled graph would recompile on).", _host_attention_name())


__all__ = ["attention_override", "sdpa", "compile_attention", "OVERRIDE_KEY"]
