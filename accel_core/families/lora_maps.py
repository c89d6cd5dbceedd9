"""Which DiT family a module is, and its LoRA name map, until the family registry answers it."""
from __future__ import annotations


def _is(module, *attrs) -> bool:
    return all(hasattr(module, a) for a in attrs)


def for_module(module):
    """(family label, lora_keys function or None: native names only) or (None, None)."""
    if _is(module, "double_blocks", "single_blocks", "final_layer"):
        from . import flux_lora

        return "Flux", flux_lora.lora_keys
    if _is(module, "transformer_blocks", "txt_norm", "img_in"):
        return "Qwen-Image", None
    if _is(module, "layers", "noise_refiner", "context_refiner", "cap_embedder"):
        from . import z_image_lora

        return "Z-Image / Lumina 2", z_image_lora.lora_keys
    if _is(module, "blocks", "head", "patch_embedding"):
        return "Wan", None
    return None, None
