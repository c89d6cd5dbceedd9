"""The webui's two hosts side by side, and the state SD Accel keeps in a webui process, with its owner.

`Session` holds all of it: the A1111 forward swap, this generation's Forge passes, the UNets
with fused LoRAs and what the last generation applied. The extension's scripts use the one
session the webui face creates (`webui.SESSION`); `finish_generation` ends a generation on
either host and is also safe to call when nothing was applied.
"""
from __future__ import annotations

from ...families import family_of
from . import forge
from .forge_dit import takes_unet_features
from .a1111 import A1111Patch, a1111_unet
from .lora import FusedLoras
from .status import Applied


def is_forge(sd_model) -> bool:
    return hasattr(sd_model, "forge_objects")


def diffusion_model(sd_model):
    """The loaded model's diffusion model: Forge's `forge_objects.unet.model.diffusion_model`, A1111's `model.diffusion_model`."""
    if is_forge(sd_model):
        return getattr(getattr(getattr(sd_model.forge_objects, "unet", None), "model", None), "diffusion_model", None)
    return getattr(getattr(sd_model, "model", None), "diffusion_model", None)


def takes_lcm(sd_model) -> bool:
    """Whether the loaded model takes an LCM-LoRA (an SD1.x/SDXL UNet), so the LCM sampler may be switched on for it."""
    return takes_unet_features(family_of(diffusion_model(sd_model)))


def is_dit(sd_model) -> bool:
    """Whether the loaded model is a DiT SD Accel knows (Flux, Qwen-Image, Wan, ...): its cache is the Step Cache, not DeepCache."""
    fam = family_of(diffusion_model(sd_model))
    return fam is not None and not takes_unet_features(fam)


class Session:
    """SD Accel's state in one webui process: owned by the extension, one per process (webui.SESSION)."""

    def __init__(self):
        self.loras = FusedLoras()
        self.last: Applied | None = None
        self.a1111 = A1111Patch(self.loras, on_applied=self._record)
        # This generation's Forge wrappers (one per sampling pass: hires fix makes two); they hold
        # their pass's runner, and through it the UNet, until the generation ends.
        self.forge_passes: list = []

    def _record(self, applied: Applied | None) -> None:
        self.last = applied

    def last_applied(self) -> Applied | None:
        return self.last

    def apply_forge(self, unet_patcher, opts, *, lora_dirs=None, progress=None):
        """A clone of Forge's UNet patcher with SD Accel applied, and what was applied (forge.apply_forge)."""
        m, applied, wrapper = forge.apply_forge(unet_patcher, opts, loras=self.loras, lora_dirs=lora_dirs, progress=progress)
        if wrapper is not None:
            self.forge_passes.append(wrapper)
        self._record(applied)
        return m, applied

    def finish_generation(self) -> dict:
        """End of a generation on either host: undo A1111's swap, restore fused LoRAs, collect the caches' stats
        ({"deepcache": [...], "stepcache": [...]}, one entry per sampling run)."""
        stats = {"deepcache": [], "stepcache": []}
        while self.forge_passes:
            for feature, runs in self.forge_passes.pop(0).finish().items():
                stats[feature] += runs
        self.a1111.last_deepcache = []
        self.a1111.undo()
        self.loras.restore()
        stats["deepcache"] += self.a1111.last_deepcache
        return stats


__all__ = ["Session", "is_forge", "a1111_unet", "diffusion_model", "takes_lcm", "is_dit"]
