"""The webui's "SD Accel" accordion as options: WebuiOptions, its fields, and parsing of what the UI sends.

Plain data (no webui imports): the scripts, the infotext and both host installers read the
same frozen dataclass, and turn it into the core's configs through its methods.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, replace

from ..backends import CHOICES
from ..casting import ATTENTION, DTYPES, CastConfig
from ..compiling import MODES, CompileConfig
from ..compile_cache import default_cache_dir
from ..errors import SDAccelError, choice_error

OFF = "off"
BACKEND_CHOICES = (OFF, *CHOICES)
DTYPE_CHOICES = (OFF, *DTYPES)
NO_LORA = "None"


@dataclass(frozen=True)
class WebuiOptions:
    """What the "SD Accel" accordion asks for, one generation at a time.

    Args:
        enabled: master switch; off means the webui runs exactly as without the extension.
        backend: "off" or a compile backend ("auto", "inductor", "onediff", "stable-fast").
        mode: compile mode (see CompileConfig).
        dtype: "off" (keep the webui's) or a CastConfig dtype ("auto", "fp16", "bf16", "fp32").
        channels_last: NHWC weights and activations (needs a cast copy of the UNet, like dtype).
        attention: SDPA kernel for the calls inside the UNet ("auto" leaves torch's choice).
        deepcache_interval: recompute the deep UNet features every N steps (1 = off).
        deepcache_depth: how many outer blocks stay live on cached steps.
        deepcache_start / deepcache_end: the fraction of the steps where caching is allowed.
        lcm_lora: LoRA name (webui LoRA folder) of an LCM-LoRA, or "None".
        lcm_strength: its weight.
        loras: (name, strength) pairs swapped into the UNet in place (no recompilation).
    """

    enabled: bool = False
    backend: str = OFF
    mode: str = "default"
    dtype: str = OFF
    channels_last: bool = False
    attention: str = "auto"
    deepcache_interval: int = 1
    deepcache_depth: int = 1
    deepcache_start: float = 0.0
    deepcache_end: float = 1.0
    lcm_lora: str = NO_LORA
    lcm_strength: float = 1.0
    loras: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if self.backend not in BACKEND_CHOICES:
            raise choice_error("backend", self.backend, BACKEND_CHOICES)
        if self.mode not in MODES:
            raise choice_error("mode", self.mode, MODES)
        if self.dtype not in DTYPE_CHOICES:
            raise choice_error("dtype", self.dtype, DTYPE_CHOICES)
        if self.attention not in ATTENTION:
            raise choice_error("attention", self.attention, ATTENTION)
        if int(self.deepcache_interval) < 1:
            raise SDAccelError(f"SD Accel: DeepCache interval must be 1 (off) or more, found {self.deepcache_interval}. Set it to 1 to switch DeepCache off, or 2-5 to cache.")
        if int(self.deepcache_depth) < 0:
            raise SDAccelError(f"SD Accel: DeepCache depth must be 0 or more, found {self.deepcache_depth}.")
        if not 0.0 <= float(self.deepcache_start) < float(self.deepcache_end) <= 1.0:
            raise SDAccelError(f"SD Accel: DeepCache start/end must satisfy 0 <= start < end <= 1 (fractions of the steps), found {self.deepcache_start}..{self.deepcache_end}.")
        # Gradio sliders deliver floats; keep ints ints so infotext round-trips exactly.
        object.__setattr__(self, "deepcache_interval", int(self.deepcache_interval))
        object.__setattr__(self, "deepcache_depth", int(self.deepcache_depth))
        object.__setattr__(self, "deepcache_start", round(float(self.deepcache_start), 3))
        object.__setattr__(self, "deepcache_end", round(float(self.deepcache_end), 3))
        object.__setattr__(self, "lcm_strength", round(float(self.lcm_strength), 3))
        object.__setattr__(self, "loras", tuple((str(n), round(float(s), 3)) for n, s in self.loras))

    # What is on (enabled and set to something other than off).
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

    def compile_config(self) -> CompileConfig | None:
        if not self.compile_on:
            return None
        # SD_ACCEL_DYNAMO_BACKEND=eager|aot_eager runs Dynamo without Inductor: isolates Inductor
        # problems when debugging (and keeps tests fast on CPUs).
        return CompileConfig(backend=self.backend, mode=self.mode, torch_backend=os.environ.get("SD_ACCEL_DYNAMO_BACKEND", "inductor"),
                             cache_dir=default_cache_dir("webui"))

    def cast_config(self) -> CastConfig | None:
        if not self.cast_on:
            return None
        return CastConfig(dtype="auto" if self.dtype == OFF else self.dtype, channels_last=self.channels_last, attention=self.attention)

    def deepcache_config(self):
        """The DeepCacheConfig these options ask for (whether or not DeepCache is on: the depth is checked before sampling)."""
        from ..deepcaching import DeepCacheConfig  # lazily: a copy of SD Accel may lack the DeepCache module

        return DeepCacheConfig(cache_interval=self.deepcache_interval, cache_depth=self.deepcache_depth,
                               start_percent=self.deepcache_start, end_percent=self.deepcache_end)


# The accordion's components, in the order `Script.ui` returns them (= the order of *args).
UI_FIELDS = tuple(f.name for f in dataclasses.fields(WebuiOptions))
# Defaults the webui Settings page can change (the rest are per-image choices).
SETTINGS_FIELDS = ("enabled", "backend", "mode", "dtype", "channels_last", "attention",
                   "deepcache_interval", "deepcache_depth", "deepcache_start", "deepcache_end")


def parse_loras(text: str) -> tuple[tuple[str, float], ...]:
    """"name:0.8, other" -> (("name", 0.8), ("other", 1.0)). Names may contain colons; the weight is after the last one."""
    out = []
    for item in (text or "").replace(";", ",").replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        name, weight = item, 1.0
        if ":" in item:
            head, tail = item.rsplit(":", 1)
            try:
                name, weight = head.strip(), float(tail)
            except ValueError:
                pass  # "sdxl:lora" style name without a weight
        if not name:
            raise SDAccelError(f"SD Accel: LoRA list entry {item!r} has no name; expected 'name:weight' entries separated by commas.")
        out.append((name, weight))
    return tuple(out)


def format_loras(loras) -> str:
    return ", ".join(f"{n}:{format_num(s)}" for n, s in loras)


def format_num(x: float) -> str:
    return f"{float(x):g}"


def options_from_args(args, defaults: WebuiOptions | None = None) -> WebuiOptions:
    """Build options from the script's positional args (UI_FIELDS order; fewer args keep defaults)."""
    base = defaults or WebuiOptions()
    values = {}
    for name, value in zip(UI_FIELDS, args):
        if name == "loras" and isinstance(value, str):
            value = parse_loras(value)
        values[name] = value
    return replace(base, **values)


def with_overrides(opts: WebuiOptions, overrides: dict | None) -> WebuiOptions:
    """Apply per-image overrides (the XYZ plot sets them on `p`); an override of an SD Accel option also enables it."""
    if not overrides:
        return opts
    values = dict(overrides)
    if "loras" in values and isinstance(values["loras"], str):
        values["loras"] = parse_loras(values["loras"])
    unknown = set(values) - set(UI_FIELDS)
    if unknown:
        raise SDAccelError(f"SD Accel: unknown option(s) {', '.join(sorted(unknown))}; expected some of {', '.join(UI_FIELDS)}.")
    values.setdefault("enabled", True)
    return replace(opts, **values)


__all__ = ["OFF", "BACKEND_CHOICES", "DTYPE_CHOICES", "NO_LORA", "ATTENTION", "MODES", "WebuiOptions", "UI_FIELDS", "SETTINGS_FIELDS",
           "parse_loras", "format_loras", "format_num", "options_from_args", "with_overrides"]
