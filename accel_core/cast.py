"""Cast a UNet to fp16/bf16, channels_last, and choose the attention kernel.

The cast makes a *copy* whose parameters are the cast tensors (no full-precision duplicate
is made on the way), because hosts share one UNet between every clone of a model: casting
in place would change what every other node sees.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from .errors import check_flag, choice_error
from .families import family_of

DTYPES = ("auto", "fp16", "bf16", "fp32")
# fp8: fp16 compute with fp8 matmuls in the linear layers (accel_core/fp8.py); GPUs with fp8 tensor cores only.
NODE_DTYPES = (*DTYPES, "fp8")
ATTENTION = ("auto", "flash", "efficient", "math", "cudnn")
_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class CastConfig:
    """Args:
        dtype: "auto" (bf16 on CPU, fp16 on CUDA), "fp16", "bf16", "fp32", or "fp8" (fp16, with the
            linear layers' matmuls in float8 on GPUs with fp8 tensor cores; see accel_core/fp8.py).
        channels_last: store conv weights (and feed inputs) in NHWC, which the fast conv kernels want.
        attention: SDPA kernel: "auto" (torch picks), "flash", "efficient" (mem-efficient), "math" or "cudnn".
    """

    dtype: str = "auto"
    channels_last: bool = True
    attention: str = "auto"

    def __post_init__(self):
        if self.dtype not in NODE_DTYPES:
            raise choice_error("dtype", self.dtype, NODE_DTYPES)
        if self.attention not in ATTENTION:
            raise choice_error("attention", self.attention, ATTENTION)
        check_flag("cast", "channels_last", self.channels_last, "Use True on GPUs and CPUs with fast NHWC convolutions (most), else False.")


def resolve_dtype(name: str, device_type: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device_type == "cuda" else torch.bfloat16
    if name == "fp8":  # the compute dtype around the fp8 matmuls
        return torch.float16
    if name not in _DTYPE:
        raise choice_error("dtype", name, NODE_DTYPES)
    return _DTYPE[name]


def sdpa_backends(attention: str):
    """The SDPBackend list for `attention`, or None for torch's own choice."""
    from torch.nn.attention import SDPBackend

    return {
        "auto": None,
        "flash": [SDPBackend.FLASH_ATTENTION],
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "math": [SDPBackend.MATH],
    }[attention]


def attention_context(attention: str):
    """A context manager that limits SDPA to the chosen kernel for the calls inside it only.

    "cudnn" prefers cuDNN's kernel and falls back to the others where cuDNN does not take the
    shape (head dims over 128: SD1.x's deepest blocks), where this PyTorch can set a priority.
    """
    backends = sdpa_backends(attention)
    if backends is None:
        return contextlib.nullcontext()
    import inspect

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if attention == "cudnn" and "set_priority" in inspect.signature(sdpa_kernel).parameters:
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        return sdpa_kernel(order, set_priority=True)
    return sdpa_kernel(backends)


def cast_copy(module: nn.Module, dtype: torch.dtype, channels_last: bool, source: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A deep copy of `module` with floating parameters/buffers in `dtype`.

    `source` optionally overrides tensors by state-dict name (a host's original weights when
    the live ones carry patches). Only the cast tensors are allocated.
    """
    fam = family_of(module)
    memo: dict[int, object] = {}
    with torch.no_grad():
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) in memo:
                continue
            src = source.get(name, p) if source else p
            t = _convert(src.detach(), p.dtype if fam is not None and fam.keeps_dtype(name) else dtype, channels_last)
            memo[id(p)] = nn.Parameter(t, requires_grad=False)
        for name, b in module.named_buffers(remove_duplicate=False):
            if id(b) not in memo:
                memo[id(b)] = _convert(b, dtype, channels_last) if b.is_floating_point() else b.clone()
    return copy.deepcopy(module, memo)


def _convert(t: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    out = t.to(dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
    if channels_last and out.dim() == 4:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def cast(module: nn.Module, config: CastConfig | None = None, device_type: str | None = None) -> nn.Module:
    """Return a cast copy of `module` (the input is never modified).

    Example:
        >>> fast = cast(unet, CastConfig(dtype="bf16", channels_last=True))
    """
    config = config or CastConfig()
    p = next(module.parameters(), None)
    dev = device_type or (p.device.type if p is not None else "cpu")
    if config.dtype == "fp8":
        from .fp8 import check_fp8_device

        check_fp8_device(dev, "SD Accel FP16 Cast")
    dtype = resolve_dtype(config.dtype, dev)
    out = cast_copy(module, dtype, config.channels_last)
    if hasattr(out, "dtype") and not isinstance(getattr(type(out), "dtype", None), property):
        out.dtype = dtype  # LDM UNets cast their inputs to this attribute
    if config.dtype == "fp8":
        from .fp8 import to_fp8

        to_fp8(out)  # after a LoRA changes the copy's weights, call fp8.refresh(out, token)
    return out


__all__ = ["CastConfig", "cast", "cast_copy", "resolve_dtype", "attention_context", "sdpa_backends", "DTYPES", "NODE_DTYPES", "ATTENTION"]
