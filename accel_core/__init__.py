"""SD Accel's host-agnostic acceleration core.

Knows torch and nn.Modules only; host adapters live in `hosts/` and are imported by the
hosts themselves. One public verb per feature, each a function driven by a config dataclass:
compile/CompileConfig, cast/CastConfig, deepcache/DeepCacheConfig, apply_loras/LoraConfig
(LoraSpec per file), lcm_sample/LcmConfig. The runtimes behind them are the modules
`compiling`, `casting`, `deepcaching`, `lora` and `lcm`: no module shares a verb's name.
"""
from .casting import CastConfig, cast
from .compiling import CompileConfig, CompiledUNet, compile
from .deepcaching import DeepCacheConfig, deepcache
from .errors import SDAccelError
from .lcm import LcmConfig, lcm_sample
from .lora import LoraConfig, LoraSpec, apply_loras

__all__ = ["CastConfig", "cast", "CompileConfig", "CompiledUNet", "compile", "DeepCacheConfig", "deepcache",
           "LoraConfig", "LoraSpec", "apply_loras", "LcmConfig", "lcm_sample", "SDAccelError"]
