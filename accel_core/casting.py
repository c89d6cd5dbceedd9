"""Cast a UNet to fp16/bf16, channels_last, and choose the attention kernel.

The cast makes a *copy* whose parameters are the cast tensors (no full-precision duplicate
is made on the way), because hosts share one UNet between every clone of a model: casting
in place would change what every other node sees.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
from dataclasses import dataclass

import torch
from torch import nn

from .errors import check_flag, choice_error
from .options import check_declared, option
from .families import family_of

logger = logging.getLogger("sd_accel")

DTYPES = ("auto", "fp16", "bf16", "fp32")
# fp8: fp16 compute with fp8 matmuls in the linear layers (accel_core/fp8.py); GPUs with fp8 tensor cores only.
NODE_DTYPES = (*DTYPES, "fp8")
ATTENTION = ("auto", "flash", "efficient", "math", "cudnn")
_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Probed once here, not per call: attention_context runs inside compiled graphs, and dynamo
# cannot trace inspect.signature (a graph break at every attention layer: 129 graphs on SD1.5).
try:
    from torch.nn.attention import sdpa_kernel as _sdpa_kernel

    _SDPA_PRIORITY = "set_priority" in inspect.signature(_sdpa_kernel).parameters
except ImportError:  # torch < 2.3 (older webui installs): no per-call kernel choice at all
    _SDPA_PRIORITY = False


@dataclass(frozen=True)
class CastConfig:
    """How to cast the UNet (see the help of each option; fp8 is accel_core/fp8.py)."""

    dtype: str = option("auto", "auto = fp16 on CUDA; on the CPU bf16 where it has AMX (faster there), else fp32 (bf16 measured slower). "
                        "fp32 restores full precision. fp8 = fp16 with float8 matmuls in the linear layers (Ada, Hopper, Blackwell "
                        "only; slightly changes the image, and is refused on other devices).",
                        label="UNet dtype", choices=NODE_DTYPES,
                        # the webui's cast starts off, and its cast copy has no fp8 path (no refresh after its LoRAs)
                        hosts={"webui": {"default": "off", "choices": ("off", *DTYPES)}})
    channels_last: bool = option(True, "NHWC memory format for convolutions (faster with fp16/bf16).", label="channels_last",
                                 hosts={"webui": {"default": False}})  # on the webui it makes a cast copy: off until asked for
    attention: str = option("auto", "PyTorch SDPA kernel: auto lets torch pick; flash / efficient / math force one; cudnn prefers "
                            "cuDNN's kernel, with flash where cuDNN does not take the shape.", label="Attention kernel", choices=ATTENTION)

    def __post_init__(self):
        check_declared(self, "cast")
        check_flag("cast", "channels_last", self.channels_last, "Use True on GPUs and CPUs with fast NHWC convolutions (most), else False.")


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_fast() -> bool:
    """Whether this CPU has AMX tiles (amx_bf16: Xeon Sapphire Rapids and later), the only CPUs
    where bf16 measured faster than fp32 for the UNet. With AVX512-BF16 alone it measured
    0.80-0.82x of fp32 (slower), and without either torch emulates bf16. Probed once."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            fast = any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:  # not Linux: ask torch, where it can tell
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        fast = bool(probe()) if probe is not None else False
    logger.info("SD Accel cast: dtype auto on this CPU is %s", "bf16 (it has AMX, where bf16 measured faster than fp32)" if fast else
                "fp32 (bf16 is faster than fp32 only with AMX, which this CPU lacks; choose bf16 to force it)")
    return fast


def resolve_dtype(name: str, device_type: str, native: torch.dtype | None = None) -> torch.dtype:
    """The compute dtype for `name`. `native`: the model's stored dtype. A bf16 model (the DiT
    families ship and run in bf16) stays bf16 under auto and fp8 on CUDA: fp16 overflows their
    activations, and their kept-precision layers would meet fp16 inputs."""
    if name in ("auto", "fp8") and device_type == "cuda" and native == torch.bfloat16:
        return torch.bfloat16
    if name == "auto":
        if device_type == "cuda":
            return torch.float16
        if device_type == "cpu":  # bf16 only where it measured faster than fp32
            return torch.bfloat16 if cpu_bf16_is_fast() else torch.float32
        return torch.bfloat16
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
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if attention == "cudnn" and _SDPA_PRIORITY:
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
            t = _convert(src.detach(), p.dtype if fam is not None and fam.keeps_dtype(name, module) else dtype, channels_last)
            memo[id(p)] = nn.Parameter(t, requires_grad=False)
        for name, b in module.named_buffers(remove_duplicate=False):
            if id(b) not in memo:
                keep = fam is not None and fam.keeps_dtype(name, module)
                memo[id(b)] = _convert(b, b.dtype if keep else dtype, channels_last) if b.is_floating_point() else b.clone()
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
    dtype = resolve_dtype(config.dtype, dev, next((q.dtype for q in module.parameters() if q.is_floating_point()), None))
    out = cast_copy(module, dtype, config.channels_last)
    if hasattr(out, "dtype") and not isinstance(getattr(type(out), "dtype", None), property):
        out.dtype = dtype  # LDM UNets cast their inputs to this attribute
    if config.dtype == "fp8":
        from .fp8 import to_fp8

        to_fp8(out)  # after a LoRA changes the copy's weights, call fp8.refresh(out, token)
    return out


__all__ = ["CastConfig", "cast", "cast_copy", "resolve_dtype", "cpu_bf16_is_fast", "attention_context", "sdpa_backends", "DTYPES", "NODE_DTYPES", "ATTENTION"]
