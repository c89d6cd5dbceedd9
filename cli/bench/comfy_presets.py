"""The `--host comfy` presets: what model, what size, how many steps, which CFG (no torch import here)."""
from __future__ import annotations

from dataclasses import dataclass

DIT_FAMILIES = ("flux", "qwen_image", "zimage", "wan", "ltx", "ltx2", "minimax")


@dataclass(frozen=True)
class ComfyPreset:
    arch: str  # "sd15" | "sdxl" | a DiT family of DIT_FAMILIES
    latent: int  # SD: latent side (pixels / 8); DiTs: the family spec in dit.py holds the latent shape
    steps: int
    cfg: float = 7.0  # the CFG scale when --cfg-scale is not given
    scheduler: str = "normal"
    tiny: bool = False  # a reduced model for the CPU (seconds, no multi-GB file)
    what: str = ""

    @property
    def dit(self) -> bool:
        return self.arch in DIT_FAMILIES


PRESETS = {
    "tiny": ComfyPreset("sd15", 16, 4, tiny=True, what="SD1.5 at 128x128, 4 steps"),
    "sd15-512": ComfyPreset("sd15", 64, 20, what="SD1.5 512x512"),
    "sdxl-1024": ComfyPreset("sdxl", 128, 20, what="SDXL 1024x1024"),
    # The DiT families at the sizes people run them (seeded random weights, written once as safetensors).
    "flux-1024": ComfyPreset("flux", 128, 20, cfg=1.0, scheduler="simple", what="Flux.1-dev (11.9B) 1024x1024, guidance 3.5"),
    "qwen-image-1328": ComfyPreset("qwen_image", 166, 20, cfg=4.0, scheduler="simple", what="Qwen-Image (20B) 1328x1328"),
    "zimage-1024": ComfyPreset("zimage", 128, 8, cfg=1.0, scheduler="simple", what="Z-Image (6B) 1024x1024"),
    "wan-480p": ComfyPreset("wan", 30, 20, cfg=5.0, scheduler="simple", what="Wan 2.2 5B 832x480, 33 frames"),
    "ltx-768x512": ComfyPreset("ltx", 16, 30, cfg=3.0, scheduler="simple", what="LTX-Video 2B 0.9.x 768x512, 97 frames"),
    # Their reduced sizes: the real ComfyUI classes at small width and depth, for the CPU and tests.
    "flux-tiny": ComfyPreset("flux", 8, 6, cfg=1.0, scheduler="simple", tiny=True, what="Flux class, width 128, 5 blocks"),
    "qwen-image-tiny": ComfyPreset("qwen_image", 8, 6, cfg=4.0, scheduler="simple", tiny=True, what="Qwen-Image class, 3 blocks"),
    "zimage-tiny": ComfyPreset("zimage", 8, 6, cfg=1.0, scheduler="simple", tiny=True, what="Z-Image class, 3 layers"),
    "wan-tiny": ComfyPreset("wan", 8, 6, cfg=5.0, scheduler="simple", tiny=True, what="Wan class, 3 blocks"),
    "ltx-tiny": ComfyPreset("ltx", 8, 6, cfg=3.0, scheduler="simple", tiny=True, what="LTX-Video class, width 64, 2 blocks"),
    "ltx2-tiny": ComfyPreset("ltx2", 8, 6, cfg=3.0, scheduler="simple", tiny=True, what="LTX-2 audio-video class (0.8.0+), width 32, 3 blocks"),
    "minimax-tiny": ComfyPreset("minimax", 8, 6, cfg=3.0, scheduler="simple", tiny=True, what="MiniMax H3 class (0.33+), width 64, 3 blocks"),
}

__all__ = ["ComfyPreset", "PRESETS", "DIT_FAMILIES"]
