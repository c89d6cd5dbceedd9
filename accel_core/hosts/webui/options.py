"""The webui's "SD Accel" accordion as options: WebuiOptions, its fields, and parsing of what the UI sends.

Plain data (no webui imports). Each field of WebuiOptions is a core option (declared once, on
the core's config, with the webui's own default where it differs: the accordion starts off)
or one of the webui's own three (enabled, lcm_lora, loras). `plan()` turns the options into
the core's configs once; the installers hand that plan down to the runtime. One set of cache
controls serves both caches: DeepCache on an SD UNet, the Step Cache on a DiT model (with its
own mode and blocks, last so older callers' positional args still fit; stepcache.py maps them).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ...casting import ATTENTION, CastConfig
from ...compiling import MODES, CompileConfig
from ...compile_cache import default_cache_dir
from ...deepcaching import DeepCacheConfig
from ...errors import SDAccelError
from ...lcm import LcmConfig
from ...stepcache import StepCacheConfig
from ...options import KEY, check_declared, declared, option

OFF = "off"
NO_LORA = "None"
CORE = "sd_accel.core"  # field metadata: (config class, field name) of the core option a webui field shows


def _core(config, name: str):
    """A WebuiOptions field showing the core option `config.name` as the webui does."""
    opt = declared(config, "webui")[name]
    return field(default=opt.default, metadata={KEY: opt, CORE: (config, name)})


@dataclass(frozen=True)
class WebuiOptions:
    """What the "SD Accel" accordion asks for, one generation at a time (see each option's help)."""

    enabled: bool = option(False, "Master switch; off means the webui runs exactly as without the extension.", label="Enable SD Accel")
    backend: str = _core(CompileConfig, "backend")
    mode: str = _core(CompileConfig, "mode")
    dtype: str = _core(CastConfig, "dtype")
    channels_last: bool = _core(CastConfig, "channels_last")
    attention: str = _core(CastConfig, "attention")
    deepcache_interval: int = _core(DeepCacheConfig, "cache_interval")
    deepcache_depth: int = _core(DeepCacheConfig, "cache_depth")
    deepcache_start: float = _core(DeepCacheConfig, "start_percent")
    deepcache_end: float = _core(DeepCacheConfig, "end_percent")
    lcm_lora: str = option(NO_LORA, "An LCM-LoRA from the webui's LoRA folder, or None.", label="LCM-LoRA")
    lcm_strength: float = _core(LcmConfig, "strength")
    loras: tuple[tuple[str, float], ...] = option((), "LoRAs swapped into the UNet in place (no recompilation).",
                                                   label="LoRA hot-swap (name:weight, comma separated)")
    stepcache_mode: str = _core(StepCacheConfig, "mode")
    stepcache_front: int = _core(StepCacheConfig, "front_blocks")
    stepcache_back: int = _core(StepCacheConfig, "back_blocks")
    stepcache_threshold: float = _core(StepCacheConfig, "threshold")

    def __post_init__(self):
        # Gradio sliders deliver floats; keep ints ints so infotext round-trips exactly.
        for name, opt in declared(self).items():
            value = getattr(self, name)
            if opt.kind == "INT" and isinstance(value, float) and value.is_integer():
                object.__setattr__(self, name, int(value))
            elif opt.kind == "FLOAT" and isinstance(value, (int, float)) and not isinstance(value, bool):
                object.__setattr__(self, name, round(float(value), 3))
        check_declared(self, "webui")
        if not float(self.deepcache_start) < float(self.deepcache_end):
            raise SDAccelError(f"SD Accel: the cache's start/end must satisfy 0 <= start < end <= 1 (fractions of the steps), found {self.deepcache_start}..{self.deepcache_end}.")
        object.__setattr__(self, "loras", tuple((str(n), round(float(s), 3)) for n, s in self.loras))

    # What is on (enabled and set to something other than off); "deepcache" is the cache: the Step Cache on a DiT.
    @property
    def compile_on(self) -> bool:
        return self.enabled and self.backend != OFF

    @property
    def cast_on(self) -> bool:
        return self.enabled and (self.dtype != OFF or self.channels_last)

    @property
    def attention_on(self) -> bool:
        return self.enabled and self.attention != "auto"

    @property
    def deepcache_on(self) -> bool:
        return self.enabled and self.deepcache_interval > 1

    @property
    def lcm_on(self) -> bool:
        return self.enabled and self.lcm_lora not in (NO_LORA, "", None)

    @property
    def loras_on(self) -> bool:
        return self.enabled and bool(self.loras)

    @property
    def active(self) -> bool:
        return any((self.compile_on, self.cast_on, self.attention_on, self.deepcache_on, self.lcm_on, self.loras_on))

    def core_values(self, config) -> dict:
        """The values of this config class's options, by the core's field names."""
        return {f.metadata[CORE][1]: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get(CORE, (None,))[0] is config}

    def compile_config(self) -> CompileConfig | None:
        if not self.compile_on:
            return None
        # SD_ACCEL_DYNAMO_BACKEND=eager|aot_eager: Dynamo without Inductor (isolates Inductor problems; fast CPU tests).
        return CompileConfig(**self.core_values(CompileConfig), torch_backend=os.environ.get("SD_ACCEL_DYNAMO_BACKEND", "inductor"),
                             cache_dir=default_cache_dir("webui"))

    def cast_config(self) -> CastConfig | None:
        if not self.cast_on:
            return None
        return CastConfig(**{**self.core_values(CastConfig), "dtype": "auto" if self.dtype == OFF else self.dtype})

    def deepcache_config(self) -> DeepCacheConfig:
        """The DeepCacheConfig these options ask for (whether or not DeepCache is on: the depth is checked before sampling)."""
        return DeepCacheConfig(**self.core_values(DeepCacheConfig))

    def plan(self) -> "Plan":
        """The core's configs for this generation (None where a feature is off)."""
        return Plan(compile=self.compile_config(), cast=self.cast_config(), deepcache=self.deepcache_config() if self.deepcache_on else None,
                    attention=self.attention if self.enabled else "auto")


@dataclass(frozen=True)
class Plan:
    """What the runtime gets: the core's configs, built once from the options at the top of a generation."""

    compile: CompileConfig | None = None
    cast: CastConfig | None = None
    deepcache: DeepCacheConfig | None = None
    attention: str = "auto"


BACKEND_CHOICES = declared(WebuiOptions)["backend"].choices
DTYPE_CHOICES = declared(WebuiOptions)["dtype"].choices
# The accordion's components, in the order `Script.ui` returns them (= the order of *args).
UI_FIELDS = tuple(f.name for f in dataclasses.fields(WebuiOptions))
# Defaults the webui Settings page can change (all but the per-image LoRA choices).
SETTINGS_FIELDS = tuple(n for n in UI_FIELDS if n not in ("lcm_lora", "lcm_strength", "loras"))
# The accordion's and the Settings page's widgets: name -> Option (kind, label, default, range, choices).
UI_OPTIONS = declared(WebuiOptions)

__all__ = ["Plan", "UI_OPTIONS", "OFF", "BACKEND_CHOICES", "DTYPE_CHOICES", "NO_LORA", "ATTENTION", "MODES", "WebuiOptions", "UI_FIELDS", "SETTINGS_FIELDS"]
