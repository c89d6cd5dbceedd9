"""Quantized UNets in the webui (Forge Neo's GGUF, fp8 and int8 checkpoints, bitsandbytes 4-bit, A1111's FP8 weight):
which SD Accel features refuse them, with what to do instead.

The probe looks at the weights themselves, not at a version or a setting: a parameter that is
not a plain fp16/bf16/fp32 tensor (a GGUF parameter, a float8 or integer dtype, a tensor
subclass that packs its data) marks the UNet as quantized. Compile and in-place LoRA fusing
would run on that storage, so they refuse before anything changes; DeepCache only calls the
UNet's own blocks, so it runs on quantized UNets as on any other.
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import SDAccelError
from .options import WebuiOptions

PLAIN = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _kind(t: torch.Tensor) -> str | None:
    if hasattr(t, "gguf_cls"):  # Forge's ParameterGGUF (backend/operations_gguf.py)
        q = getattr(t.gguf_cls, "__name__", None)
        return f"GGUF{' ' + q if q else ''}"
    if type(t) not in (torch.Tensor, nn.Parameter):
        return f"{type(t).__name__} ({str(t.dtype).replace('torch.', '')})"  # bitsandbytes Params4bit, QuantizedTensor, ...
    if t.dtype not in PLAIN:
        return str(t.dtype).replace("torch.", "")  # float8_e4m3fn, int8, uint8 (packed)
    return None


def quantized_storage(unet: nn.Module) -> str | None:
    """How `unet` stores its weights when that is not plain fp16/bf16/fp32 (e.g. "GGUF Q4_K, e.g. input_blocks.1.1.proj_in.weight"), else None."""
    for name, p in unet.named_parameters():
        kind = _kind(p)
        if kind is not None:
            return f"{kind}, e.g. {name}"
    return None


def refused_on_quantized(opts: WebuiOptions) -> list[str]:
    """The options asked for that do not run on a quantized UNet."""
    return [label for label, on in (("compile", opts.compile_on), ("LoRA hot-swap", opts.loras_on), ("LCM-LoRA", opts.lcm_on)) if on]


def check_quantized(unet: nn.Module, opts: WebuiOptions, what_to_do: str) -> None:
    """Raise SDAccelError, before anything is changed, when `opts` asks for a feature that cannot run on `unet`'s quantized weights."""
    refused = refused_on_quantized(opts)
    if not refused:
        return
    found = quantized_storage(unet)
    if found is None:
        return
    raise SDAccelError(f"SD Accel: {' and '.join(refused)} {'need' if len(refused) > 1 else 'needs'} a UNet with fp16, bf16 or fp32 weights; this UNet stores them quantized "
                       f"({found}). {what_to_do} DeepCache works on quantized UNets. Nothing was applied and the model was not changed.")


FORGE_HINT = ("Load a checkpoint that is not quantized (not GGUF / fp8 / int8 / nf4) with 'Diffusion in Low Bits' on Automatic, "
              "or switch those options off; for LoRAs on this model use the prompt's <lora:name:weight>.")
A1111_HINT = ("Set Settings > Optimizations > FP8 weight to Disable, or pick a UNet dtype (fp16 / bf16) so SD Accel runs a float copy, "
              "or switch those options off.")


__all__ = ["quantized_storage", "refused_on_quantized", "check_quantized", "FORGE_HINT", "A1111_HINT"]
