"""SD Accel's host-agnostic acceleration core.

Knows torch and nn.Modules only; host adapters live in `hosts/` and are imported by the
hosts themselves. One public verb per feature, each a function driven by a config dataclass:
compile/CompileConfig, cast/CastConfig, deepcache/DeepCacheConfig, apply_loras/LoraConfig
(LoraSpec per file), lcm_sample/LcmConfig.
"""
# The submodules load first and the verbs are bound last: importing a submodule sets the
# package attribute of its name (`accel_core.deepcache` the module), and these lines run after
# every such import, so `from sd_accel.accel_core import deepcache` is always the function.
from . import cast as _cast_module  # noqa: F401
from . import compile as _compile_module  # noqa: F401
from . import deepcache as _deepcache_module  # noqa: F401
from . import lcm as _lcm_module  # noqa: F401
from . import lora as _lora_module  # noqa: F401
from .cast import CastConfig, cast
from .compile import CompileConfig, CompiledUNet, compile
from .deepcache import DeepCacheConfig, deepcache
from .errors import SDAccelError
from .lcm import LcmConfig, lcm_sample
from .lora import LoraConfig, LoraSpec, apply_loras

__all__ = ["CastConfig", "cast", "CompileConfig", "CompiledUNet", "compile", "DeepCacheConfig", "deepcache",
           "LoraConfig", "LoraSpec", "apply_loras", "LcmConfig", "lcm_sample", "SDAccelError"]
