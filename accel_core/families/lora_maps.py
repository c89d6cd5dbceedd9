"""LoRA name maps the DiT registrations share."""
from __future__ import annotations


def own_names(module) -> dict:
    """The map of a family whose LoRAs use the module's own layer names (Qwen-Image, Wan): nothing
    beyond them. `lora_names` gives every model its own names (dots or kohya underscores, with
    any of the usual prefixes: `diffusion_model.`, `transformer.`, `lora_unet_`, ...)."""
    return {}
