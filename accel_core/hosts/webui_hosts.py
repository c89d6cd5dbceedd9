"""The webui's two hosts side by side: which one runs, and the end of a generation on either.

The scripts apply through `A1111.apply` (A1111) or `apply_forge` (Forge) and always end with
`finish_generation`, which is also safe to call when nothing was applied.
"""
from __future__ import annotations

from .webui_a1111 import A1111, a1111_unet
from .webui_forge import apply_forge, forge_passes
from .webui_lora import restore_loras


def is_forge(sd_model) -> bool:
    return hasattr(sd_model, "forge_objects")


def finish_generation() -> dict:
    """End of a generation on either host: undo A1111's swap, restore fused LoRAs, collect DeepCache stats."""
    runs = []
    while forge_passes:
        runs += forge_passes.pop(0).finish()
    A1111.last_deepcache = []
    A1111.undo()
    restore_loras()
    return {"deepcache": runs + A1111.last_deepcache}


__all__ = ["A1111", "a1111_unet", "apply_forge", "is_forge", "finish_generation"]
