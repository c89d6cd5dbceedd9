"""SD Accel's host-agnostic acceleration core.

Knows torch and nn.Modules only; host adapters live in `hosts/` and are imported by the
hosts themselves. One public verb per feature, each driven by a config dataclass.
"""
from .cast import CastConfig, cast
from .compile import CompileConfig, CompiledUNet, compile
from .errors import SDAccelError

__all__ = ["CastConfig", "cast", "CompileConfig", "CompiledUNet", "compile", "SDAccelError"]
