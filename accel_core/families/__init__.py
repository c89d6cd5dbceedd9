"""Model families: one registration per family, asked by every feature and host.

A `Family` says how to recognise a model (a probe on the module: class name and attributes,
no host import), the method a host routes through, what to compile (the whole module with
per-unit fallback, or, for DiT models, the repeated transformer blocks regionally), the LoRA
name map, and where a step cache may cut it (skip depths for UNets, block lists and
ComfyUI's `patches_replace["dit"]` names for DiT models). Features ask `family_of(module)`
and the description's slots; none branches on a family's name. A new family is one file in
this package that calls `register` (imported at the bottom of this file).
"""
from .base import (BlockList, Family, ModuleDtype, compile_units, describe, families, family_of, flatten, known_names,  # noqa: F401
                   module_dtype, register, require, skip_count, split_unit, units_of)

# The registrations (each file calls `register`); the UNets first.
from . import ldm, diffusers, flux, qwen_image, zimage, wan, ltx, ltx2, minimax  # noqa: E402,F401
__all__ = ["Family", "BlockList", "register", "families", "family_of", "require", "known_names", "skip_count", "describe",
           "compile_units", "split_unit", "units_of", "flatten", "module_dtype", "ModuleDtype"]
