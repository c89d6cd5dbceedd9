"""FP8 matmuls for a UNet's linear layers (and 1x1 convolutions) on GPUs with fp8 tensor cores.

`to_fp8(unet)` replaces every eligible `nn.Linear` / 1x1 `nn.Conv2d` with an `FP8Linear` that
runs `torch._scaled_mm` on float8 (e4m3) operands: the weight is quantized once per tensor
(one fp32 scale), the activation per call (one scale from its absolute maximum). 3x3
convolutions, norms and attention stay in the compute dtype. Use it on a copy of the UNet
(FP16 Cast makes one).

The half-precision weight stays the module's `weight` Parameter: state-dict keys, LoRA name
matching and in-place LoRA fusing (LoRA Hot-Swap, ComfyUI's weight patches) see the layer as
before. The fp8 copy is a buffer that `refresh(unet, token)` re-quantizes in place whenever
the host's weight token changes (a LoRA swapped, patches applied), so compiled graphs and CUDA
graphs keep reading the same memory.

Needs compute capability 8.9 or newer (Ada, Hopper, Blackwell); `fp8_support_error` says why
it cannot run elsewhere.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .errors import SDAccelError
from .log import logger

E4M3 = getattr(torch, "float8_e4m3fn", None)
E4M3_MAX = 448.0
MIN_CAPABILITY = (8, 9)
_OTHERS = "one of auto, fp16, bf16, fp32 instead (auto: fp16 on CUDA)"


@dataclass(frozen=True)
class FP8Config:
    """Args:
        skip: substrings of module names that stay in the compute dtype. The default keeps the
            timestep / class embeddings and each ResBlock's embedding projection (a batch of
            one or two rows: nothing to gain, and they steer every block).
        convs: also convert 1x1 convolutions (SD1.x / SD2.x transformer proj_in / proj_out).
    """

    skip: tuple[str, ...] = ("time_embed", "label_emb", "emb_layers")
    convs: bool = True


def fp8_support_error(device: torch.device | str | None) -> str | None:
    """Why fp8 matmuls cannot run on `device` (expected / found / what to do), or None when they can."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if E4M3 is None or not hasattr(torch, "_scaled_mm"):
        return (f"dtype fp8 needs PyTorch's float8 matmul (torch._scaled_mm, PyTorch 2.1 or newer); this PyTorch is "
                f"{torch.__version__}. Update PyTorch, or pick {_OTHERS}.")
    if dev.type != "cuda":
        return (f"dtype fp8 needs an NVIDIA GPU with fp8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, "
                f"Blackwell); this model runs on {dev.type}. Pick {_OTHERS}.")
    if not torch.cuda.is_available():
        return f"dtype fp8 needs CUDA, which this PyTorch cannot use here. Pick {_OTHERS}."
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    cap = tuple(torch.cuda.get_device_capability(index))
    if cap < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        return (f"dtype fp8 needs fp8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell); found "
                f"{name} with compute capability {cap[0]}.{cap[1]}. Pick {_OTHERS}.")
    return None


def check_fp8_device(device, what: str = "SD Accel") -> None:
    """Raise SDAccelError when fp8 matmuls cannot run on `device`."""
    reason = fp8_support_error(device)
    if reason:
        raise SDAccelError(f"{what}: {reason} The model was left unchanged.")


def _quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / scale) in e4m3 and the fp32 scale, one scale for the whole tensor."""
    scale = t.detach().abs().amax().float().clamp(min=1e-12) / E4M3_MAX
    q = (t.float() * scale.reciprocal()).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


class FP8Linear(nn.Module):
    """A linear layer (or 1x1 convolution) whose matmul runs in e4m3 with per-tensor scales.

    `weight` and `bias` are the original module's Parameters (same objects); `weight_fp8` and
    `weight_scale` are their quantized copy, refreshed in place by `quantize_weight`.
    """

    def __init__(self, src: nn.Module):
        super().__init__()
        self.conv = isinstance(src, nn.Conv2d)
        self.weight = src.weight
        self.bias = src.bias
        self.out_features = src.weight.shape[0]
        self.in_features = src.weight[0].numel()
        dev = src.weight.device
        with torch.inference_mode(False):  # normal tensors: refreshed in place inside or outside inference mode
            self.register_buffer("weight_fp8", torch.empty((self.out_features, self.in_features), dtype=E4M3, device=dev), persistent=False)
            self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=dev), persistent=False)
        self.quantize_weight()

    @torch.no_grad()
    def quantize_weight(self):
        w = self.weight.detach().reshape(self.out_features, self.in_features)
        q, scale = _quantize(w.to(self.weight_fp8.device))
        self.weight_fp8.copy_(q)  # same storage: captured graphs read the new values
        self.weight_scale.copy_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:  # 1x1 conv: a matmul over channels, pixel by pixel
            b, _, h, w = x.shape
            rows = x.permute(0, 2, 3, 1).reshape(-1, self.in_features)
        else:
            lead = x.shape[:-1]
            rows = x.reshape(-1, self.in_features)
        xq, xs = _quantize(rows)
        out = torch._scaled_mm(xq.contiguous(), self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale, out_dtype=x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        if self.conv:
            return out.reshape(b, h, w, self.out_features).permute(0, 3, 1, 2)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, conv1x1={self.conv}"


def _eligible(name: str, mod: nn.Module, config: FP8Config) -> bool:
    if any(s in name for s in config.skip):
        return False
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dtype == E4M3:
        return False
    if isinstance(mod, nn.Linear):
        pass
    elif config.convs and isinstance(mod, nn.Conv2d):
        if tuple(mod.kernel_size) != (1, 1) or tuple(mod.stride) != (1, 1) or mod.groups != 1 or tuple(mod.dilation) != (1, 1) \
                or mod.padding not in ((0, 0), 0, "valid"):
            return False
    else:
        return False
    # torch._scaled_mm needs both matrix sides that meet the weight in multiples of 16.
    return w.shape[0] % 16 == 0 and w[0].numel() % 16 == 0


@dataclass
class FP8Report:
    converted: int
    kept: int  # linear / conv layers left in the compute dtype

    def summary(self) -> str:
        return f"{self.converted} layers run fp8 matmuls, {self.kept} convolutions / linears stay in the compute dtype"


_tokens: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


def to_fp8(module: nn.Module, config: FP8Config | None = None, token: object = None) -> FP8Report:
    """Replace `module`'s eligible linear / 1x1 conv layers with FP8Linear, in place.

    Call it on a copy (FP16 Cast's). `token` is the host's weight state now (see `refresh`).

    Example:
        >>> fast = cast(unet, CastConfig(dtype="fp16"))
        >>> to_fp8(fast)
    """
    if E4M3 is None:
        raise SDAccelError(f"SD Accel fp8: this PyTorch ({torch.__version__}) has no float8 dtype. Update PyTorch, or pick fp16 / bf16.")
    if config is None:
        from .families import family_of

        fam = family_of(module)
        config = FP8Config(skip=fam.fp8_skip) if fam is not None and fam.fp8_skip is not None else FP8Config()
    converted = kept = 0
    for name, mod in list(module.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, FP8Linear):
                continue
            if _eligible(full, child, config):
                setattr(mod, child_name, FP8Linear(child))
                converted += 1
            elif isinstance(child, (nn.Linear, nn.Conv2d)):
                kept += 1
    _tokens[module] = token
    report = FP8Report(converted, kept)
    logger.info("SD Accel fp8: %s", report.summary())
    return report


def refresh(module: nn.Module, token: object) -> bool:
    """Re-quantize the fp8 weight copies when the host's weight token changed since the last call.

    `token` is anything comparable that changes whenever the half-precision weights do (ComfyUI:
    the patches applied and the hot-swapped LoRAs). Returns whether anything was re-quantized.
    """
    if module in _tokens and _tokens[module] == token:
        return False
    for mod in module.modules():
        if isinstance(mod, FP8Linear):
            mod.quantize_weight()
    _tokens[module] = token
    return True


def has_fp8(module: nn.Module) -> bool:
    return any(isinstance(m, FP8Linear) for m in module.modules())


__all__ = ["FP8Config", "FP8Linear", "FP8Report", "to_fp8", "refresh", "has_fp8", "fp8_support_error", "check_fp8_device", "MIN_CAPABILITY"]
