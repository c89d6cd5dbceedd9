"""The LoRA set a ComfyUI clone wants fused (`HotSwapSet`, an attachment) and who owns what is
fused in the shared UNet (`Owner`, recorded on the patcher). When ownership changes: lora_owner.py.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

from ...log import logger
from ...lora import LoraConfig, LoraSpec, apply_loras, lora_state

LORA_KEY = "sd_accel.lora"
OWNER_ATTR = "_sd_accel_lora_owner"  # on a patcher that fused a set: its Owner


@dataclass(frozen=True)
class HotSwapSet:
    """The LoRAs a clone wants fused while it samples (immutable: clones share it)."""

    specs: tuple[LoraSpec, ...]
    config: LoraConfig = LoraConfig()

    def plus(self, spec: LoraSpec) -> "HotSwapSet":
        return HotSwapSet(self.specs + (spec,), self.config)


def hotswap_set(model) -> HotSwapSet | None:
    s = model.get_attachment(LORA_KEY) if hasattr(model, "get_attachment") else None
    return s if isinstance(s, HotSwapSet) else None


class Owner:
    """Stands for one patcher in `LoraState.owner` without keeping it alive.

    lazy: the deltas may stay fused after a run (False: ComfyUI patches the same layers, or the
    pre-run did not finish; then ON_CLEANUP restores).
    """

    __slots__ = ("unet", "lazy")

    def __init__(self, unet):
        self.unet = weakref.ref(unet)
        self.lazy = False


def owner_of(patcher, unet) -> Owner:
    own = patcher.__dict__.get(OWNER_ATTR)  # clone() builds a new object: never inherited
    if own is None:
        own = patcher.__dict__[OWNER_ATTR] = Owner(unet)
        weakref.finalize(patcher, release, own).atexit = False
    return own


def release(own: Owner | None):
    """Restore the original weights if `own`'s patcher still owns what is fused."""
    unet = own.unet() if own is not None else None
    if unet is None:
        return
    state = lora_state(unet)
    with state.lock:
        if state.owner is not own:
            return
        state.owner = None
        if state.active:
            report = apply_loras(unet, [])
            logger.debug("SD Accel LoRA Hot-Swap: released: %s", report.summary())


__all__ = ["LORA_KEY", "OWNER_ATTR", "HotSwapSet", "hotswap_set", "Owner", "owner_of", "release"]
