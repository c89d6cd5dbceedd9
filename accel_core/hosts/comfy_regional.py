"""ComfyUI: route a DiT model's blocks through the regional compile (accel_core/regional.py).

An APPLY_MODEL wrapper hands the model a copy of the call's transformer_options whose
`patches_replace["dit"]` holds one replacement per block (Flux `("double_block", i)` /
`("single_block", i)`, Qwen-Image and Wan `("double_block", i)`), made per call so it chains
to whatever another pack put there for this run: their replacement runs first, outside
compiled code, and gets our compiled block as its `original_block`. Nothing in model_options
or on the model changes.

The compiled block gets a transformer_options holding only what blocks read
(`optimized_attention_override`): dynamo guards on what it reads, and the host's dict changes
per block (block_index) and per run. When the run has patches that the blocks themselves
call (attn1_patch, ...), blocks run as the host's own code for that call.
"""
from __future__ import annotations

import functools

import torch

from .. import registry
from ..compile import CompileConfig
from ..families import Family

KEEP = ("optimized_attention_override",)
INNER_PATCHES = ("attn1_patch", "attn1_output_patch", "attn2_patch", "attn2_output_patch")
_OPTIONS_AT = 5  # BaseModel.apply_model(x, t, c_concat, c_crossattn, control, transformer_options, ...)


class _Block:
    """One `patches_replace["dit"]` entry for one call: the block through its kind's compiled callable."""

    __slots__ = ("rc", "kind", "name", "prev")

    def __init__(self, rc, kind, name, prev):
        self.rc, self.kind, self.name, self.prev = rc, kind, name, prev

    def __call__(self, args, extra):
        original = extra["original_block"]
        if self.prev is not None:  # another pack's replacement: it decides, our compiled block is its original
            return self.prev(args, {**extra, "original_block": functools.partial(self._run, original)})
        return self._run(original, args)

    def _run(self, original, args):
        to = args.get("transformer_options") or {}
        patches = to.get("patches") or {}
        if any(patches.get(k) for k in INNER_PATCHES):
            return original(args)
        # Contiguous inputs: the first block often gets a transposed view (Wan's patch embedding),
        # the others contiguous outputs; dynamo guards on strides, so one frame serves all only so.
        slim = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        slim["transformer_options"] = {k: to[k] for k in KEEP if k in to}
        return self.rc.run(self.kind, self.name, original, slim, args)


def _with_blocks(to: dict, rc) -> dict:
    to = dict(to)
    replace = dict(to.get("patches_replace") or {})
    dit = dict(replace.get("dit") or {})
    for key, (kind, name) in rc.targets.items():
        dit[key] = _Block(rc, kind, name, dit.get(key))
    replace["dit"] = dit
    to["patches_replace"] = replace
    return to


def regional_wrapper(family: Family, config: CompileConfig, executor, *args, **kwargs):
    """APPLY_MODEL wrapper of a compiled DiT clone."""
    rc = registry.regional_for(executor.class_obj.diffusion_model, family, config)
    if len(args) > _OPTIONS_AT:
        args = (*args[:_OPTIONS_AT], _with_blocks(args[_OPTIONS_AT] or {}, rc), *args[_OPTIONS_AT + 1:])
    else:
        kwargs["transformer_options"] = _with_blocks(kwargs.get("transformer_options") or {}, rc)
    with rc.calling():
        return executor(*args, **kwargs)


__all__ = ["regional_wrapper", "KEEP", "INNER_PATCHES"]
