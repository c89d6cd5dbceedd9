"""The callable both webui hosts run instead of the UNet's forward for a generation.

It composes what the generation's plan (the core's configs, built once from the webui's
options by the installer) asks for: the cast copy (with its compute dtype under autocast), the
compiled callable or DeepCache's full/shallow paths, and the attention kernel.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ...cast import attention_context, resolve_dtype
from ...compile import CompiledUNet
from ...registry import compiled_for
from .cache import cast_copy_for
from .deepcache import DeepCacheRun

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


def build_runner(unet: nn.Module, plan, device_type: str, progress=None) -> tuple[Runner, CompiledUNet | None, nn.Module]:
    """The callable that replaces `unet`'s forward for a generation, its compiled holder (if any), and the module it runs.

    `plan`: the generation's configs (options.Plan: compile, cast, deepcache, attention; None where off).
    """
    # The webui's own pieces first (its cast copy, DeepCache's webui hooks), then the core's.
    target = cast_copy_for(unet, plan.cast) if plan.cast is not None else unet
    dc = DeepCacheRun(target, plan.deepcache, plan.compile, progress) if plan.deepcache is not None else None
    compiled = compiled_for(target, plan.compile) if plan.compile is not None else None
    call = compiled if compiled is not None else class_forward(target)
    if dc is not None and compiled is not None:
        compiled = dc.full  # what runs compiled now: DeepCache's full path (and its shallow one)
    dtype = resolve_dtype(plan.cast.dtype, device_type) if plan.cast is not None else None
    channels_last = plan.cast is not None and plan.cast.channels_last
    return Runner(call, dtype, channels_last, plan.attention, dc), compiled, target


__all__ = ["MISSING", "Runner", "build_runner", "class_forward"]
