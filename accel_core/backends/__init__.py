"""Compile backends behind one interface.

Each backend is probed once (import system only, nothing imported until it is used) and
compiles a callable. `resolve("auto")` picks the best one available on the device.
"""
from __future__ import annotations

from .base import Backend, BackendUnavailable
from .inductor import InductorBackend
from .onediff import OneDiffBackend
from .stable_fast import StableFastBackend

BACKENDS: dict[str, Backend] = {
    b.name: b for b in (InductorBackend(), OneDiffBackend(), StableFastBackend())
}
CHOICES = ("auto", *BACKENDS)
# Order for "auto": on CUDA the specialised compilers first when present; inductor is
# always there and is the only one that also runs on the CPU.
AUTO_ORDER_CUDA = ("stable-fast", "onediff", "inductor")


def resolve(name: str, device_type: str) -> Backend:
    """The backend to use for `name` on `device_type`; falls back to inductor with one log line."""
    from ..errors import choice_error
    from ..optional import warn_missing

    if name == "auto":
        order = AUTO_ORDER_CUDA if device_type == "cuda" else ("inductor",)
        for candidate in order:
            b = BACKENDS[candidate]
            if b.available(device_type):
                return b
        return BACKENDS["inductor"]
    if name not in BACKENDS:
        raise choice_error("backend", name, CHOICES)
    b = BACKENDS[name]
    if not b.available(device_type):
        missing = b.missing(device_type)
        warn_missing(missing, f"so the {name} backend is not available on {device_type}; using inductor (torch.compile) instead")
        return BACKENDS["inductor"]
    return b


__all__ = ["Backend", "BackendUnavailable", "BACKENDS", "CHOICES", "resolve"]
