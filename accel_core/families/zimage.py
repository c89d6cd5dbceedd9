"""Z-Image and Lumina 2 (ComfyUI's `comfy/ldm/lumina` `NextDiT`; Z-Image is NextDiT with
`z_image_modulation`).

The main `layers` (30 on Z-Image) run after the noise and context refiners (2 blocks each),
all `JointTransformerBlock`s. ComfyUI's NextDiT offers no `patches_replace["dit"]` hook for
them (read in 0.3.64, 0.8.0 and 0.33.0), so a host compiles its `_forward` whole, with these
blocks as the fallback units.
"""
from __future__ import annotations

from .base import BlockList, Family, register, units_of
from ._dit import probe
from . import zimage_lora

_PARTS = ("x_embedder", "t_embedder", "cap_embedder", "noise_refiner", "context_refiner", "layers", "final_layer")

ZIMAGE = register(Family(
    name="zimage", display="Z-Image / Lumina 2 (NextDiT)",
    probe=probe(("NextDiT",), "layers", "noise_refiner", "context_refiner"),
    entry=("_forward", "forward"),
    lora_keys=zimage_lora.lora_keys,
    blocks=(BlockList("noise_refiner"), BlockList("context_refiner"), BlockList("layers")),
    units=lambda m: units_of(m, _PARTS),
    fp8_skip=("t_embedder", "adaLN_modulation"),
))
