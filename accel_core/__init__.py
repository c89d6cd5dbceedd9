"""SD Accel's host-agnostic acceleration core.

Knows torch and nn.Modules only; host adapters live in `hosts/` and are imported by the
hosts themselves. One public verb per feature, each driven by a config dataclass:
compile/CompileConfig, cast/CastConfig, deepcache/DeepCacheConfig, apply_loras/LoraConfig,
lcm_sample/LcmConfig.
"""
import importlib

from .cast import CastConfig, cast
from .compile import CompileConfig, CompiledUNet, compile
from .errors import SDAccelError

# The feature modules load on first use (they register benchmark rows when imported).
_LAZY = {"deepcache": "deepcache", "DeepCacheConfig": "deepcache", "apply_loras": "lora", "LoraSpec": "lora",
         "LoraConfig": "lora", "lcm_sample": "lcm", "LcmConfig": "lcm"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CastConfig", "cast", "CompileConfig", "CompiledUNet", "compile", "SDAccelError", *_LAZY]
