"""One registry of compiled artifacts per module, for every host (ComfyUI, webui, diffusers).

What is kept for a module (a UNet, or SD Accel's cast copy of one): its compiled callables,
keyed by CompileConfig (the whole forward) or (CompileConfig, name) (another entry over its
blocks, such as DeepCache's full and shallow paths), and one derived copy (the webui's cast
copy) with the key it was made for.

The artifacts are stored ON the module (attribute `_sd_accel_artifacts`), not in a table
keyed by it: a CompiledUNet references its module, so a WeakKeyDictionary would keep every
module it ever saw alive (a dropped FP16 Cast copy kept its ~1.6 GB of GPU weights, seen in
`sd-accel bench --host comfy` on an H200). On the module, the pair is a cycle that Python's
garbage collector frees together once the model is dropped. A copy of the module (FP16
Cast deep-copies it) starts empty: compiled code is bound to the module it was made for.
"""
from __future__ import annotations

import weakref
from typing import Callable

from torch import nn

from .compiling import CompileConfig, CompiledUNet

ATTR = "_sd_accel_artifacts"


class Artifacts:
    """What SD Accel made for one module."""

    def __init__(self):
        self.compiled: dict[object, CompiledUNet] = {}  # and RegionalCompiled under (config, "regional")
        self.copy_key = None
        self.copy: nn.Module | None = None
        self.block_hooks: dict = {}  # (point, arg names) -> the BlockHook in place of that block (families/hooks.py)

    def __deepcopy__(self, memo):
        return Artifacts()

    def __copy__(self):
        return Artifacts()


class LiveModules:
    """Which modules have artifacts now, for `modules()` and `clear()`: weak, it lists modules and
    never keeps one alive. The one instance is LIVE."""

    def __init__(self):
        self._modules: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()

    def add(self, module: nn.Module) -> None:
        self._modules.add(module)

    def all(self) -> list[nn.Module]:
        return list(self._modules)

    def forget(self) -> None:
        self._modules.clear()


LIVE = LiveModules()


def artifacts(module: nn.Module) -> Artifacts:
    """The module's artifacts, made empty on first use."""
    art = module.__dict__.get(ATTR)
    if not isinstance(art, Artifacts):
        art = Artifacts()
        object.__setattr__(module, ATTR, art)  # plain attribute: no submodule, no state_dict entry, no nn.Module hooks
    LIVE.add(module)  # also for a copy that came with an empty one (see __deepcopy__)
    return art


def compiled_of(module: nn.Module) -> dict[object, CompiledUNet]:
    """The module's compiled callables (empty when it has none); nothing is created."""
    art = module.__dict__.get(ATTR)
    return art.compiled if isinstance(art, Artifacts) else {}


def compiled_for(module: nn.Module, config: CompileConfig, name: str = "", entry: Callable | None = None) -> CompiledUNet:
    """The module compiled with `config`, made once per (module, config) and kept on the module.

    With `name` and `entry`: another callable over the module's blocks (DeepCache's paths),
    compiled once per (module, config, name) with the same fallback and lifetime.
    """
    compiled = artifacts(module).compiled
    key = (config, name) if name else config
    if key not in compiled:
        compiled[key] = CompiledUNet(module, config, entry=entry, name=name)
    return compiled[key]


def regional_for(module: nn.Module, family, config: CompileConfig):
    """The module's DiT blocks compiled regionally with `config` (accel_core/regional.py), made once and kept on the module."""
    from .regional import RegionalCompiled

    compiled = artifacts(module).compiled
    key = (config, "regional")
    if key not in compiled:
        compiled[key] = RegionalCompiled(module, family, config)
    return compiled[key]


def key_config(key) -> CompileConfig:
    """The CompileConfig of a registry key."""
    return key[0] if isinstance(key, tuple) else key


def modules() -> list[tuple[nn.Module, Artifacts]]:
    """Every live module that has artifacts, with them."""
    out = [(m, m.__dict__.get(ATTR)) for m in LIVE.all()]
    return [(m, a) for m, a in out if isinstance(a, Artifacts)]


def clear() -> int:
    """Drop every module's artifacts. Returns how many modules had some."""
    n = 0
    for module in LIVE.all():
        if module.__dict__.pop(ATTR, None) is not None:
            n += 1
    LIVE.forget()
    return n


__all__ = ["Artifacts", "artifacts", "compiled_of", "compiled_for", "regional_for", "key_config", "modules", "clear", "ATTR"]
