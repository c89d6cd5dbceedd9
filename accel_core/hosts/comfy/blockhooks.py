"""ComfyUI: offer the `patches_replace["dit"]` block hook where a family's forward has none (NextDiT).

Each such block gets a `BlockHook` (accel_core/families/hooks.py) as an object patch on the
clone (`add_object_patch("diffusion_model.layers.<i>", hook)`): ComfyUI sets it in
`patch_model` and puts the block back in `unpatch_model`; the incoming MODEL has no patch. The
hook owns no weights and keeps the block's parameter names, so `state_dict()` keys, LoRA
patches (ComfyUI's loader, ours) and DynamicVRAM's per-module loading see the model as before;
with no dit entry in a call's transformer_options it is the block itself.
"""
from __future__ import annotations

from ...families import Family
from ...families.hooks import hook_for, needs_hooks
from ...registry import artifacts

_PREFIX = "diffusion_model"


def install_block_hooks(m, family: Family, unet) -> int:
    """Object patches on the clone `m` that put a BlockHook in place of each block of `unet` whose
    forward offers no hook (idempotent: a block already hooked keeps its hook). Returns how many."""
    # one hook per block, kept by the module that holds the blocks (the clone's, e.g. a cast copy), shared by its clones
    n, table = 0, artifacts(m.get_model_object(_PREFIX)).block_hooks
    for bl, mods in needs_hooks(family, unet):
        for i in range(len(mods)):
            key = f"{_PREFIX}.{bl.attr}.{i}"
            block = m.get_model_object(key)  # this clone's object patch, else the block itself
            m.add_object_patch(key, hook_for(block, (bl.patch, i), bl.args, table))
            n += 1
    return n


__all__ = ["install_block_hooks"]
