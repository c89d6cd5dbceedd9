"""ComfyUI: route a DiT model's blocks through the regional compile (accel_core/regional.py).

An APPLY_MODEL wrapper hands the model a copy of the call's transformer_options whose
`patches_replace["dit"]` holds one replacement per block (Flux `("double_block", i)` /
`("single_block", i)`, Qwen-Image and Wan `("double_block", i)`), made per call so it chains
to whatever another pack put there for this run: their replacement runs first, outside
compiled code, and gets our compiled block as its `original_block`. Nothing in model_options
or on the model changes.

The per-block entries (`regional.with_blocks`) are the core's: Forge Neo's DiT models offer the
same hooks, and its adapter uses them too.
"""
from __future__ import annotations

from ... import registry
from ...compiling import CompileConfig
from ...families import Family
from ...regional import INNER_PATCHES, KEEP, with_blocks

_OPTIONS_AT = 5  # BaseModel.apply_model(x, t, c_concat, c_crossattn, control, transformer_options, ...)


def regional_wrapper(family: Family, config: CompileConfig, executor, *args, **kwargs):
    """APPLY_MODEL wrapper of a compiled DiT clone."""
    rc = registry.regional_for(executor.class_obj.diffusion_model, family, config)
    if len(args) > _OPTIONS_AT:
        args = (*args[:_OPTIONS_AT], with_blocks(args[_OPTIONS_AT] or {}, rc), *args[_OPTIONS_AT + 1:])
    else:
        kwargs["transformer_options"] = with_blocks(kwargs.get("transformer_options") or {}, rc)
    with rc.calling():
        return executor(*args, **kwargs)


__all__ = ["regional_wrapper", "KEEP", "INNER_PATCHES"]
