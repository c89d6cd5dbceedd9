"""The callable both webui hosts run instead of the UNet's forward for a generation.

It composes what the options ask for: the cast copy (with its compute dtype under autocast),
the compiled callable or DeepCache's full/shallow paths, and the attention kernel.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..casting import attention_context, resolve_dtype
from ..compiling import CompiledUNet
from ..registry import compiled_for
from .webui_cache import cast_copy_for
from .webui_deepcache import DeepCacheRun
from .webui_options import WebuiOptions
from .webui_status import feature_module

MISSING = object()  # "the module had no instance forward" (None could be one)


class Runner:
    """Calls the (cast, compiled, DeepCache-d) UNet with the chosen attention kernel and compute dtype.

    On A1111 it is installed as the UNet's instance `forward`, so it must never call the
    UNet through `__call__` (that would come back here): it calls the class forward.
    """

    def __init__(self, call, dtype: torch.dtype | None, channels_last: bool, attention: str, deepcache: DeepCacheRun | None = None):
        self.call, self.dtype, self.channels_last, self.attention = call, dtype, channels_last, attention
        self.deepcache = deepcache

    def __call__(self, x, *args, **kwargs):
        in_dtype = x.dtype
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._contexts(x.device.type):
            out = (self.deepcache or self.call)(x, *args, **kwargs)
        return out.to(in_dtype) if self.dtype is not None and torch.is_tensor(out) else out

    @contextlib.contextmanager
    def _contexts(self, device_type: str):
        with contextlib.ExitStack() as stack:
            stack.enter_context(attention_context(self.attention))
            if self.dtype is not None:
                # The webui's autocast (fp16 on CUDA) would recast a bf16 copy's weights on every
                # op; ours, nested inside, sets the copy's own dtype (and off for fp32).
                low = self.dtype in (torch.float16, torch.bfloat16)
                stack.enter_context(torch.autocast(device_type, dtype=self.dtype if low else None, enabled=low))
            yield

    def finish(self) -> list[dict]:
        if self.deepcache is None:
            return []
        self.deepcache.finish()
        return self.deepcache.runs


def class_forward(module: nn.Module):
    return type(module).forward.__get__(module)


def build_runner(unet: nn.Module, opts: WebuiOptions, device_type: str, progress=None) -> tuple[Runner, CompiledUNet | None, nn.Module]:
    """The callable that replaces `unet`'s forward for a generation, its compiled holder (if any), and the module it runs."""
    target, dtype = unet, None
    cc = opts.cast_config()
    if cc is not None:
        dtype = resolve_dtype(cc.dtype, device_type)
        target = cast_copy_for(unet, cc)
    config = opts.compile_config()
    compiled = compiled_for(target, config) if config is not None else None
    call = compiled if compiled is not None else class_forward(target)
    dc = None
    if opts.deepcache_on and feature_module("deepcache") is not None:
        dc = DeepCacheRun(target, opts.deepcache_config(), config, progress)
        if config is not None:
            compiled = dc.full  # what runs compiled now: DeepCache's full path (and its shallow one)
    attention = opts.attention if opts.enabled else "auto"
    return Runner(call, dtype, opts.channels_last and opts.cast_on, attention, dc), compiled, target


__all__ = ["MISSING", "Runner", "build_runner", "class_forward"]
