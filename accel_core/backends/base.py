from __future__ import annotations

from typing import Callable

from torch import nn


class BackendUnavailable(RuntimeError):
    pass


class Backend:
    """A compiler that turns a callable (the UNet forward, or one submodule's forward) into a faster one.

    `compile` is cheap and lazy for every backend here: the real conversion happens at the
    first call, which is where conversion failures surface (and where the core's
    per-submodule fallback catches them).
    """

    name: str = ""
    modes: tuple[str, ...] = ("default",)
    requires: tuple[str, ...] = ()
    devices: tuple[str, ...] = ("cuda",)

    def available(self, device_type: str) -> bool:
        from ..optional import is_available

        return device_type in self.devices and all(is_available(r) for r in self.requires)

    def missing(self, device_type: str) -> str:
        from ..optional import is_available

        for r in self.requires:
            if not is_available(r):
                return r
        return f"{self.name} for {device_type} (it runs on {', '.join(self.devices)} only)"

    def compile(self, fn: Callable, owner: nn.Module, config) -> Callable:  # pragma: no cover - interface
        raise NotImplementedError


class MethodModule(nn.Module):
    """Presents `owner.<method>` as a module's forward, for compilers that take modules only."""

    def __init__(self, fn: Callable, owner: nn.Module):
        super().__init__()
        self.owner = owner
        self._fn = fn

    def forward(self, *args, **kwargs):
        return self._fn(*args, **kwargs)
