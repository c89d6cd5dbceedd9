"""stable-diffusion-webui (AUTOMATIC1111) and Forge adapter.

The extension's scripts (`scripts/sd_accel_*.py`) hold the UI; everything they apply goes
through here. `modules.*` (webui) and `backend.*` (Forge) are imported inside functions only.

- A1111: the UNet is `sd_model.model.diffusion_model`, the CompVis/LDM `UNetModel`, called
  through `nn.Module.__call__` by the webui's wrappers. For one generation we set an
  *instance* `forward` on it (a `_Runner`: cast copy, compiled callable, attention kernel)
  and take it off again in `postprocess`, at the start of the next generation, and on
  model load, so a switched-off option leaves the webui's own code path untouched.
  `modules.sd_unet` (TensorRT's mechanism) was not used: it is a process-wide setting that
  moves the real UNet to the CPU, which suits a separate engine, not options that change
  per generation; while an SD Unet is active we step aside and say so.
- Forge: `process_before_every_sampling` clones `p.sd_model.forge_objects.unet` (Forge
  resets it from `forge_objects_after_applying_lora` before every sampling pass, so the
  clone lives for that pass only) and installs a `model_function_wrapper` that routes the
  diffusion model's forward through the compiled callable for the call only.

Compiled callables and cast copies hang off the UNet module itself (`_Artifacts`), so they
live exactly as long as that checkpoint's UNet: a checkpoint change never runs a stale
compiled UNet, and an unloaded one frees its graphs (a WeakKeyDictionary would not: its
values, holding the module, keep the key alive).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import weakref
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..backends import BACKENDS, CHOICES
from ..cast import ATTENTION, DTYPES, CastConfig, attention_context, cast, resolve_dtype
from ..compile import MODES, CompileConfig, CompiledUNet, CompileReport
from ..compile_cache import default_cache_dir
from ..errors import SDAccelError, choice_error
from ..log import logger
from ..unet import LDM, unet_kind

OFF = "off"
BACKEND_CHOICES = (OFF, *CHOICES)
DTYPE_CHOICES = (OFF, *DTYPES)
NO_LORA = "None"

# --- options -------------------------------------------------------------------------------------


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
    return ", ".join(f"{n}:{_num(s)}" for n, s in loras)


def _num(x: float) -> str:
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


# --- infotext ----------------------------------------------------------------------------------------
# One key per feature, only for features that are on, so images made without SD Accel carry nothing.
K_COMPILE, K_CAST, K_DEEPCACHE, K_LCM, K_LORA, K_STATUS = (
    "SD Accel compile", "SD Accel cast", "SD Accel DeepCache", "SD Accel LCM-LoRA", "SD Accel LoRA", "SD Accel status")
SETTING_KEYS = (K_COMPILE, K_CAST, K_DEEPCACHE, K_LCM, K_LORA)


def to_infotext(opts: WebuiOptions) -> dict[str, str]:
    """The infotext entries recording `opts` (what `from_infotext` reads back)."""
    out = {}
    if opts.compile_on:
        out[K_COMPILE] = f"{opts.backend} {opts.mode}"
    if opts.cast_on or opts.attention_on:
        parts = [opts.dtype] + (["channels_last"] if opts.channels_last else []) + [f"attention={opts.attention}"]
        out[K_CAST] = " ".join(parts)
    if opts.deepcache_on:
        out[K_DEEPCACHE] = f"interval={opts.deepcache_interval} depth={opts.deepcache_depth} start={_num(opts.deepcache_start)} end={_num(opts.deepcache_end)}"
    if opts.lcm_on:
        out[K_LCM] = f"{opts.lcm_lora}:{_num(opts.lcm_strength)}"
    if opts.loras_on:
        out[K_LORA] = format_loras(opts.loras)
    return out


def _kv(text: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in str(text).split() if "=" in tok)


def from_infotext(params: dict) -> WebuiOptions:
    """Options recorded in an image's parsed infotext (the dict the webui's parser returns).

    Features without a key are off, so pasting an image made without SD Accel switches it off.
    Raises SDAccelError for a value SD Accel did not write.
    """
    values: dict = {"enabled": any(k in params for k in SETTING_KEYS)}
    try:
        if K_COMPILE in params:
            backend, _, mode = str(params[K_COMPILE]).strip().partition(" ")
            values.update(backend=backend, mode=mode.strip() or "default")
        if K_CAST in params:
            toks = str(params[K_CAST]).split()
            values.update(dtype=toks[0], channels_last="channels_last" in toks, attention=_kv(params[K_CAST]).get("attention", "auto"))
        if K_DEEPCACHE in params:
            kv = _kv(params[K_DEEPCACHE])
            values.update(deepcache_interval=int(kv["interval"]), deepcache_depth=int(kv.get("depth", 1)),
                          deepcache_start=float(kv.get("start", 0)), deepcache_end=float(kv.get("end", 1)))
        if K_LCM in params:
            ((name, strength),) = parse_loras(str(params[K_LCM]))
            values.update(lcm_lora=name, lcm_strength=strength)
        if K_LORA in params:
            values["loras"] = parse_loras(str(params[K_LORA]))
    except SDAccelError:
        raise
    except (KeyError, ValueError, IndexError) as e:
        raise SDAccelError(f"SD Accel: could not read the SD Accel entries of this infotext ({type(e).__name__}: {e}); "
                           f"expected what SD Accel writes, e.g. '{K_COMPILE}: inductor default'.") from e
    return WebuiOptions(**values)


@functools.lru_cache(maxsize=None)
def infotext_field(name: str):
    """A paste function for one accordion component: params -> its value (None leaves it as is).

    One function object per field (cached), so the txt2img and img2img entries match for "Send to".
    """
    def read(params: dict):
        try:
            opts = from_infotext(params)
        except SDAccelError as e:
            logger.warning("%s", e)
            return None
        value = getattr(opts, name)
        return format_loras(value) if name == "loras" else value
    read.__name__ = f"sd_accel_paste_{name}"
    return read


# --- feature modules written alongside (DeepCache, LoRA hot-swap, LCM) ----------------------------------

FEATURES = {"deepcache": "DeepCache", "lora": "LoRA hot-swap", "lcm": "LCM-LoRA"}


@functools.lru_cache(maxsize=None)
def feature_module(name: str):
    """The core module for a feature, or None when this copy of SD Accel does not have it."""
    import importlib

    try:
        return importlib.import_module(f"{__package__.rsplit('.', 1)[0]}.{name}")
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(f".{name}"):
            return None
        raise


def feature_status() -> dict[str, str | None]:
    """feature -> None when usable, else the reason it is not."""
    out = {}
    for name, label in FEATURES.items():
        try:
            mod = feature_module(name)
        except Exception as e:  # a broken optional module must not take the UI down
            out[name] = f"{label} failed to import: {type(e).__name__}: {e}"
            continue
        out[name] = None if mod is not None else f"{label} is not part of this SD Accel version yet."
    return out


# --- per-UNet artifacts -----------------------------------------------------------------------------

_ATTR = "_sd_accel_artifacts"
_MISSING = object()
_live: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class _Artifacts:
    """Compiled callables and the cast copy that belong to one UNet module (stored on it)."""

    def __init__(self):
        self.compiled: dict[CompileConfig, CompiledUNet] = {}
        self.cast_key = None
        self.cast_copy: nn.Module | None = None

    def __deepcopy__(self, memo):
        return _Artifacts()  # a copy of the UNet (our own cast copy included) starts empty

    @staticmethod
    def of(module: nn.Module) -> "_Artifacts":
        art = module.__dict__.get(_ATTR)
        if not isinstance(art, _Artifacts):
            art = _Artifacts()
            module.__dict__[_ATTR] = art  # a plain attribute: no submodule, no state_dict entry
        _live.add(module)  # also for a copy that came with an empty one (see __deepcopy__)
        return art


def compiled_for(module: nn.Module, config: CompileConfig) -> CompiledUNet:
    art = _Artifacts.of(module)
    if config not in art.compiled:
        art.compiled[config] = CompiledUNet(module, config)
    return art.compiled[config]


def _weights_token(module: nn.Module):
    # Changes when the webui loads other weights into the same module (checkpoint switch with
    # the same architecture) or patches them in place (LoRA applied to the original).
    params = list(module.parameters())
    return (len(params), params[0].data_ptr() if params else 0, sum(p._version for p in params))


def cast_copy_for(unet: nn.Module, config: CastConfig) -> nn.Module:
    """The UNet cast per `config`, made once per (weights, config); one copy is kept per UNet."""
    art = _Artifacts.of(unet)
    key = (config.dtype, config.channels_last, _weights_token(unet))
    if art.cast_key != key:
        art.cast_copy, art.cast_key = None, None  # free the old copy before making the new one
        copy = cast(unet, CastConfig(dtype=config.dtype, channels_last=config.channels_last))
        _norms_to_fp32(copy)
        art.cast_copy, art.cast_key = copy, key
    return art.cast_copy


def _norms_to_fp32(module: nn.Module) -> None:
    # The webui UNets' GroupNorm32 runs in fp32 (`super().forward(x.float())`) and relies on
    # CUDA autocast to upcast fp16 weights; CPU has no such cast ("mixed dtype (CPU)"). Norm
    # weights are tiny, so they stay fp32 in the copy, which every device accepts.
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                for name, p in list(m.named_parameters(recurse=False)):
                    if p.is_floating_point() and p.dtype != torch.float32:
                        setattr(m, name, nn.Parameter(p.float(), requires_grad=False))


def clear_caches() -> int:
    """Drop every compiled callable and cast copy (the Settings tab's "Clear" button). Returns how many UNets had some."""
    n = 0
    for module in list(_live):
        if module.__dict__.pop(_ATTR, None) is not None:
            n += 1
    _live.clear()
    torch._dynamo.reset()
    return n


def _key_label(key) -> str:
    # CompileConfig for the whole UNet, (CompileConfig, path name) for DeepCache's full/shallow paths.
    cfg, name = key if isinstance(key, tuple) else (key, "")
    return f"{cfg.backend} {cfg.mode}" + (f" [{name}]" if name else "")


def cache_state() -> list[dict]:
    """One entry per module with SD Accel artifacts (a webui UNet or SD Accel's cast copy of one)."""
    arts = [(m, m.__dict__.get(_ATTR)) for m in list(_live)]
    arts = [(m, a) for m, a in arts if isinstance(a, _Artifacts)]
    copies = {id(a.cast_copy): a.cast_key for _, a in arts if a.cast_copy is not None}
    out = []
    for module, art in arts:
        kind = f"cast copy ({copies[id(module)][0]}{', channels_last' if copies[id(module)][1] else ''})" if id(module) in copies else "webui UNet"
        out.append({
            "module": f"{type(module).__name__} at {id(module):#x}, {kind}",
            "cast_copy": art.cast_copy is not None,
            "compiled": [{"config": _key_label(key), "status": cu.report.status, "summary": cu.report.summary()}
                         for key, cu in art.compiled.items()],
        })
    return out


# --- what one generation applied ---------------------------------------------------------------------


@dataclass
class Applied:
    """What was applied for one generation, for the infotext status and the tab."""

    host: str
    options: WebuiOptions
    notes: list[str] = field(default_factory=list)
    compile_report: CompileReport | None = None  # the report only: an Applied must not keep a UNet alive
    lora: str | None = None  # the hot-swap report (A1111; on Forge the weights change at the first UNet call)

    def status(self) -> str | None:
        """The infotext status: what did not go as asked (None when everything applied cleanly)."""
        parts = list(self.notes)
        r = self.compile_report
        if r is not None and r.status in ("partial", "eager"):
            parts.append(f"compile {r.status}: {len(r.fallbacks)} block(s) eager")
        return "; ".join(parts) or None

    def describe(self) -> str:
        lines = [f"{self.host}: " + (", ".join(f"{k[len('SD Accel '):]}: {v}" for k, v in to_infotext(self.options).items()) or "nothing")]
        if self.compile_report is not None:
            lines.append("compile: " + self.compile_report.summary())
        if self.lora:
            lines.append("LoRA: " + self.lora)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


_last: dict[str, Applied | None] = {"applied": None}


def last_applied() -> Applied | None:
    return _last["applied"]


def _record(applied: Applied | None) -> Applied | None:
    _last["applied"] = applied
    return applied


def _unavailable_notes(opts: WebuiOptions) -> list[str]:
    notes = []
    status = feature_status()
    for name, on in (("deepcache", opts.deepcache_on), ("lora", opts.loras_on), ("lcm", opts.lcm_on)):
        if on and status[name]:
            notes.append(f"{FEATURES[name]} not applied: {status[name]}")
    return notes


# --- DeepCache walks over the webui UNets ---------------------------------------------------------------
# Each is the host's UNetModel.forward, walked block by block and cut at skip `depth`
# (input block `depth`, consumed by output block N-1-depth), as hosts/comfy_deepcache.py does
# for ComfyUI. Full (`cached` None): returns (output, the h entering output block N-1-depth).
# Shallow: input blocks 0..depth, then output blocks N-1-depth.. from `cached`.


def _a1111_walk(unet, depth: int, cached, x, timesteps=None, context=None, y=None, **kwargs):
    """A1111's ldm (SD1.x/2.x) and sgm (SDXL) UNetModel.forward (repositories/stable-diffusion-stability-ai
    and generative-models at the commits webui 1.10 pins)."""
    import sys

    # The module's own timestep_embedding (the webui may have patched it there).
    timestep_embedding = sys.modules[type(unet).__module__].timestep_embedding
    shallow = cached is not None
    if (y is not None) != (unet.num_classes is not None):
        raise ValueError("must specify y if and only if the model is class-conditional")
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False))
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)
    h = x.type(unet.dtype) if type(unet).__module__.startswith("ldm.") else x  # sgm's forward leaves x as is
    hs = []
    for i, module in enumerate(unet.input_blocks):
        if shallow and i > depth:
            break
        h = module(h, emb, context)
        hs.append(h)
    h = cached if shallow else unet.middle_block(h, emb, context)
    j0 = len(unet.input_blocks) - 1 - depth
    captured = None
    for j, module in enumerate(unet.output_blocks):
        if shallow and j < j0:
            continue
        if j == j0 and not shallow:
            captured = h
        h = torch.cat([h, hs.pop()], dim=1)
        h = module(h, emb, context)
    out = unet.out(h.type(x.dtype))
    return out if shallow else (out, captured)


def _forge_walk(unet, depth: int, cached, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
    """Forge's IntegratedUNet2DConditionModel.forward (backend/nn/unet.py, June 2025), with its block
    modifiers, block patches and ControlNet residuals for the blocks that run."""
    from backend.nn.unet import apply_control, timestep_embedding

    from ..deepcache import drop_skipped_control

    shallow = cached is not None
    to = transformer_options
    to["original_shape"] = list(x.shape)
    to["transformer_index"] = 0
    patches = to.get("patches", {})
    modifiers = to.get("block_modifiers", [])
    if (y is not None) != (unet.num_classes is not None):
        raise ValueError("must specify y if and only if the model is class-conditional")
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(x.dtype))
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)
    j0 = len(unet.input_blocks) - 1 - depth
    hs, h = [], x
    for i, module in enumerate(unet.input_blocks):
        if shallow and i > depth:
            break
        to["block"] = ("input", i)
        for m in modifiers:
            h = m(h, "before", to)
        h = module(h, emb, context, to)
        h = apply_control(h, control, "input")
        for m in modifiers:
            h = m(h, "after", to)
        for p in patches.get("input_block_patch", ()):
            h = p(h, to)
        hs.append(h)
        for p in patches.get("input_block_patch_after_skip", ()):
            h = p(h, to)
    if shallow:
        drop_skipped_control(control, j0)
        h = cached.clone() if "output_block_patch" in patches else cached
    else:
        to["block"] = ("middle", 0)
        for m in modifiers:
            h = m(h, "before", to)
        h = unet.middle_block(h, emb, context, to)
        h = apply_control(h, control, "middle")
        for m in modifiers:
            h = m(h, "after", to)
    captured = None
    for j, module in enumerate(unet.output_blocks):
        if shallow and j < j0:
            continue
        to["block"] = ("output", j)
        if j == j0 and not shallow:
            captured = h.clone() if "output_block_patch" in patches else h
        hsp = apply_control(hs.pop(), control, "output")
        for p in patches.get("output_block_patch", ()):
            h, hsp = p(h, hsp, to)
        h = torch.cat([h, hsp], dim=1)
        del hsp
        output_shape = hs[-1].shape if len(hs) > 0 else None
        for m in modifiers:
            h = m(h, "before", to)
        h = module(h, emb, context, to, output_shape)
        for m in modifiers:
            h = m(h, "after", to)
    to["block"] = ("last", 0)
    for m in modifiers:
        h = m(h, "before", to)
    if "group_norm_wrapper" in to:
        h = unet.out[1:](to["group_norm_wrapper"](unet.out[0], h, to))
    else:
        h = unet.out(h)
    for m in modifiers:
        h = m(h, "after", to)
    out = h.type(x.dtype)
    return out if shallow else (out, captured)


def _walk_for(unet):
    if type(unet).__module__.startswith(("ldm.", "sgm.")):
        return _a1111_walk
    if type(unet).__name__ == "IntegratedUNet2DConditionModel":
        return _forge_walk
    return None


def _full_path(walk, unet, depth, *args, **kwargs):
    return walk(unet, depth, None, *args, **kwargs)


def _shallow_path(walk, unet, depth, cached, *args, **kwargs):
    return walk(unet, depth, cached, *args, **kwargs)


def deepcache_paths(unet: nn.Module, depth: int, compile_config: CompileConfig | None):
    """(full, shallow) callables over `unet` cut at `depth`: eager, or compiled once each (kept on the UNet)."""
    walk = _walk_for(unet)
    if walk is None:
        raise SDAccelError(f"SD Accel DeepCache: {type(unet).__module__}.{type(unet).__name__} is not a webui UNet SD Accel can walk "
                           "(A1111's ldm/sgm UNetModel or Forge's IntegratedUNet2DConditionModel).")
    full = functools.partial(_full_path, walk, unet, depth)
    shallow = functools.partial(_shallow_path, walk, unet, depth)
    if compile_config is None:
        return full, shallow
    art = _Artifacts.of(unet)
    out = []
    for name, fn in ((f"deepcache full d{depth}", full), (f"deepcache shallow d{depth}", shallow)):
        key = (compile_config, name)
        if key not in art.compiled:
            art.compiled[key] = CompiledUNet(unet, compile_config, entry=fn, name=name)
        out.append(art.compiled[key])
    return tuple(out)


class _DeepCacheRun:
    """Decides full/shallow per UNet call, in eager Python, from the sampler's denoiser step.

    `progress()` returns (step, total) of the webui's CFGDenoiser (the same counter its own
    skip-early-cond option uses) or None. A new sampling pass (hires fix, next batch) is noticed
    when the total changes or the step goes back; calls within one step are told apart by order.
    """

    def __init__(self, unet, config, compile_config, progress, paths=None):
        from ..deepcache import _CUDAGRAPH_MODES, DeepCacheState, check_depth

        check_depth(unet, config)
        self.full, self.shallow = paths or deepcache_paths(unet, config.cache_depth, compile_config)
        self.state = DeepCacheState(config)
        self.progress = progress
        self.copy_kept = compile_config is not None and compile_config.mode in _CUDAGRAPH_MODES
        self.total, self.last_step, self.call_in_step = None, -1, 0
        self.runs: list[dict] = []

    def __call__(self, x, *args, **kwargs):
        pos = self.progress() if self.progress is not None else None
        if not pos or not pos[1]:
            out, _ = self.full(x, *args, **kwargs)
            return out
        step, total = int(pos[0]), int(pos[1])
        if total != self.total or step < self.last_step:
            self.finish()
            self.state.begin(list(range(total, 0, -1)), total)
            self.total, self.last_step = total, -1
        if step != self.last_step:
            self.last_step, self.call_in_step = step, 0
        keys = (f"call{self.call_in_step}",)
        self.call_in_step += 1
        self.state.check_metadata(x)
        cached = None if self.state.wants_full(step) else self.state.lookup(keys, x.shape[0])
        self.state.mark(step, cached is None)
        if cached is None:
            out, kept = self.full(x, *args, **kwargs)
            self.state.store(keys, kept.clone() if self.copy_kept else kept, step)
            return out
        return self.shallow(cached, x, *args, **kwargs)

    def finish(self):
        if self.state.running:
            self.runs.append(self.state.finish())
        self.total = None


# --- the runner both hosts call instead of the UNet forward -------------------------------------------


class _Runner:
    """Calls the (cast, compiled, DeepCache-d) UNet with the chosen attention kernel and compute dtype.

    On A1111 it is installed as the UNet's instance `forward`, so it must never call the
    UNet through `__call__` (that would come back here): it calls the class forward.
    """

    def __init__(self, call, dtype: torch.dtype | None, channels_last: bool, attention: str, deepcache: _DeepCacheRun | None = None):
        self.call, self.dtype, self.channels_last, self.attention = call, dtype, channels_last, attention
        self.deepcache = deepcache

    def __call__(self, x, *args, **kwargs):
        in_dtype = x.dtype
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._contexts(x.device.type):
            out = (self.deepcache or self.call)(x, *args, **kwargs)
        return out.to(in_dtype) if self.dtype is not None and torch.is_tensor(out) else out

    @contextlib.contextmanager
    def _contexts(self, device_type: str):
        with contextlib.ExitStack() as stack:
            stack.enter_context(attention_context(self.attention))
            if self.dtype is not None:
                # The webui's autocast (fp16 on CUDA) would recast a bf16 copy's weights on every
                # op; ours, nested inside, sets the copy's own dtype (and off for fp32).
                low = self.dtype in (torch.float16, torch.bfloat16)
                stack.enter_context(torch.autocast(device_type, dtype=self.dtype if low else None, enabled=low))
            yield

    def finish(self) -> list[dict]:
        if self.deepcache is None:
            return []
        self.deepcache.finish()
        return self.deepcache.runs


def _class_forward(module: nn.Module):
    return type(module).forward.__get__(module)


def deepcache_config(opts: WebuiOptions):
    from ..deepcache import DeepCacheConfig

    return DeepCacheConfig(cache_interval=opts.deepcache_interval, cache_depth=opts.deepcache_depth,
                           start_percent=opts.deepcache_start, end_percent=opts.deepcache_end)


def build_runner(unet: nn.Module, opts: WebuiOptions, device_type: str, progress=None) -> tuple[_Runner, CompiledUNet | None, nn.Module]:
    """The callable that replaces `unet`'s forward for a generation, its compiled holder (if any), and the module it runs."""
    target, dtype = unet, None
    cc = opts.cast_config()
    if cc is not None:
        dtype = resolve_dtype(cc.dtype, device_type)
        target = cast_copy_for(unet, cc)
    config = opts.compile_config()
    compiled = compiled_for(target, config) if config is not None else None
    call = compiled if compiled is not None else _class_forward(target)
    dc = None
    if opts.deepcache_on and feature_module("deepcache") is not None:
        dc = _DeepCacheRun(target, deepcache_config(opts), config, progress)
        if config is not None:
            compiled = dc.full  # what runs compiled now: DeepCache's full path (and its shallow one)
    attention = opts.attention if opts.enabled else "auto"
    return _Runner(call, dtype, opts.channels_last and opts.cast_on, attention, dc), compiled, target


# --- LoRA hot-swap and LCM-LoRA ------------------------------------------------------------------------

LORA_EXTS = (".safetensors",)
_fused: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def lora_files(lora_dir: str | None) -> dict[str, str]:
    """LoRA name (file name without extension, as the webui shows it) -> path, from the webui's LoRA folder."""

    out: dict[str, str] = {}
    if not lora_dir or not os.path.isdir(lora_dir):
        return out
    for base, _, files in sorted(os.walk(lora_dir, followlinks=True)):
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() in LORA_EXTS:
                out.setdefault(stem, os.path.join(base, f))
    return out


def lora_specs(opts: WebuiOptions, lora_dir: str | None) -> list:
    """The LoraSpecs (hot-swap list plus the LCM-LoRA) named by `opts`, resolved in `lora_dir`."""
    from ..lora import LoraSpec

    files = lora_files(lora_dir)
    wanted = list(opts.loras) if opts.loras_on else []
    if opts.lcm_on:
        wanted.append((opts.lcm_lora, opts.lcm_strength))
    specs = []
    for name, strength in wanted:
        path = files.get(name) or (name if os.path.isfile(name) else None)
        if path is None:
            known = ", ".join(sorted(files)[:12]) or "none"
            raise SDAccelError(f"SD Accel: LoRA {name!r} is not in the webui's LoRA folder ({lora_dir}); found: {known}. "
                               "Use a file name from that folder (without .safetensors), or a full path to a .safetensors file.")
        specs.append(LoraSpec(path, float(strength)))
    return specs


def fuse_loras(module: nn.Module, specs) -> str | None:
    """Bring `module`'s weights to exactly `specs` (in place); remembered so `restore_loras` can undo it."""
    from ..lora import apply_loras

    report = apply_loras(module, specs)
    if specs:
        _fused.add(module)
    else:
        _fused.discard(module)
    return report.summary()


def restore_loras() -> int:
    """Put the original weights back into every UNet SD Accel fused LoRAs into (bit-exact). Returns how many."""
    n = 0
    for module in list(_fused):
        from ..lora import apply_loras

        apply_loras(module, [])
        _fused.discard(module)
        n += 1
    return n


def _webui_lora_active(unet: nn.Module) -> bool:
    """Whether A1111's built-in Lora extension has networks on this UNet (it patches the same weights in place)."""
    import sys

    networks = sys.modules.get("networks")
    if networks is not None and getattr(networks, "loaded_networks", None):
        return True
    return any(getattr(m, "network_current_names", ()) for m in unet.modules())


# --- A1111 ------------------------------------------------------------------------------------------


def is_forge(sd_model) -> bool:
    return hasattr(sd_model, "forge_objects")


def a1111_unet(sd_model) -> nn.Module | None:
    model = getattr(sd_model, "model", None)
    unet = getattr(model, "diffusion_model", None)
    return unet if unet_kind(unet) == LDM else None


class A1111Patch:
    """The one scoped forward swap SD Accel has on the A1111 UNet at a time (apply / undo)."""

    def __init__(self):
        self.unet_ref: weakref.ref | None = None
        self.prev = _MISSING
        self.runner: _Runner | None = None
        self.compiled: CompiledUNet | None = None
        self.key = None
        self.last_deepcache: list[dict] = []

    @property
    def active(self) -> bool:
        return self.runner is not None and self.unet_ref is not None and self.unet_ref() is not None

    def apply(self, sd_model, opts: WebuiOptions, *, lora_dir: str | None = None, progress=None) -> Applied | None:
        """Route `sd_model`'s UNet through SD Accel for the coming sampling (idempotent per options).

        `progress()` -> (step, total) of the sampler's denoiser, for DeepCache.
        """
        if not opts.active:
            self.undo()
            return _record(None)
        applied = Applied("A1111", opts, _unavailable_notes(opts))
        unet = a1111_unet(sd_model)
        if unet is None:
            self.undo()
            applied.notes.append("not applied: the loaded model is not an SD1.x/SD2.x/SDXL UNet")
            return _record(applied)
        active_sd_unet = _active_sd_unet()
        if active_sd_unet:
            self.undo()
            applied.notes.append(f"not applied: the SD Unet {active_sd_unet!r} is active (Settings > SD Unet)")
            return _record(applied)
        if "forward" in unet.__dict__ and not (self.runner is not None and unet.__dict__["forward"] is self.runner):
            # Another extension (ControlNet, ...) routes the UNet through its own forward for this
            # generation; going around it would silently drop what it adds.
            self.undo()
            applied.notes.append("not applied: another extension replaced the UNet's forward for this generation (e.g. ControlNet)")
            return _record(applied)
        key = (id(unet), opts, _weights_token(unet) if opts.cast_on else None)
        if self.active and self.unet_ref() is unet and self.key == key:
            applied.compile_report = self.compiled.report if self.compiled is not None else None
            return _record(applied)
        self.undo()
        device_type = next(unet.parameters()).device.type
        needs_runner = opts.compile_on or opts.cast_on or opts.attention_on or (opts.deepcache_on and feature_module("deepcache") is not None)
        runner, compiled, target = build_runner(unet, opts, device_type, progress) if needs_runner else (None, None, unet)
        applied.compile_report = compiled.report if compiled is not None else None
        self._apply_loras(target, opts, lora_dir, applied)
        if runner is not None:
            self.prev = unet.__dict__.get("forward", _MISSING)
            unet.forward = runner  # a plain callable: nn.Module.__setattr__ keeps it in __dict__
            self.unet_ref, self.runner, self.compiled, self.key = weakref.ref(unet), runner, compiled, key
        return _record(applied)

    @staticmethod
    def _apply_loras(target, opts, lora_dir, applied):
        if not (opts.loras_on or opts.lcm_on) or feature_module("lora") is None:
            return
        if _webui_lora_active(target):
            applied.notes.append("LoRA hot-swap not applied: the prompt's <lora:...> networks are active on the same weights; use one or the other")
            return
        applied.lora = fuse_loras(target, lora_specs(opts, lora_dir))

    def undo(self) -> bool:
        """Take SD Accel's forward off the UNet and its LoRAs out of the weights. True when a forward was removed."""
        restore_loras()
        unet = self.unet_ref() if self.unet_ref is not None else None
        runner, prev = self.runner, self.prev
        self.unet_ref, self.runner, self.prev, self.compiled, self.key = None, None, _MISSING, None, None
        if runner is not None:
            self.last_deepcache = runner.finish()
        if unet is None or runner is None:
            return False
        if unet.__dict__.get("forward") is not runner:
            logger.warning("SD Accel: the UNet's forward was replaced by something else after SD Accel; leaving it as it is.")
            return False
        if prev is _MISSING:
            del unet.__dict__["forward"]
        else:
            unet.__dict__["forward"] = prev
        return True


def _active_sd_unet() -> str | None:
    try:
        from modules import sd_unet
    except ImportError:
        return None
    cur = getattr(sd_unet, "current_unet", None)
    if cur is None:
        return None
    return getattr(getattr(cur, "option", None), "label", None) or type(cur).__name__


A1111 = A1111Patch()


# --- Forge ----------------------------------------------------------------------------------------


class _ForgeWrapper:
    """Forge `model_function_wrapper`: routes the diffusion model's forward through SD Accel for one call.

    One per sampling pass (Forge rebuilds its UNet patcher before each). Forge deep-copies
    `model_options` on every clone; the copy is this same object (its state is this pass's).
    """

    def __init__(self, opts: WebuiOptions, previous=None, *, specs=None, progress=None):
        self.opts, self.previous, self.progress = opts, previous, progress
        self.specs = list(specs) if specs is not None else None
        self.runner: _Runner | None = None
        self.unet_ref = None

    def __deepcopy__(self, memo):
        return self

    def _runner_for(self, unet, device_type):
        if self.runner is None or self.unet_ref() is not unet:
            if self.specs is not None:
                # Fused now, after Forge has loaded the UNet and applied its own LoRAs for this pass.
                fuse_loras(unet, self.specs)
            self.runner, _, _ = build_runner(unet, self.opts, device_type, self.progress)
            self.unet_ref = weakref.ref(unet)
        return self.runner

    def __call__(self, apply_model, args: dict):
        unet = apply_model.__self__.diffusion_model
        runner = self._runner_for(unet, args["input"].device.type)
        prev = unet.__dict__.get("forward", _MISSING)
        unet.forward = runner
        try:
            if self.previous is not None:
                return self.previous(apply_model, args)
            return apply_model(args["input"], args["timestep"], **args["c"])
        finally:
            if prev is _MISSING:
                unet.__dict__.pop("forward", None)
            else:
                unet.__dict__["forward"] = prev

    def finish(self) -> list[dict]:
        return self.runner.finish() if self.runner is not None else []


def apply_forge(unet_patcher, opts: WebuiOptions, *, lora_dir: str | None = None, progress=None):
    """A clone of Forge's UNet patcher with SD Accel applied, and what was applied. The input is never modified."""
    if not opts.active:
        return unet_patcher, _record(None)
    applied = Applied("Forge", opts, _unavailable_notes(opts))
    if not hasattr(unet_patcher, "clone") or not hasattr(unet_patcher, "model_options"):
        raise SDAccelError(f"SD Accel: expected Forge's UNet patcher (p.sd_model.forge_objects.unet), found {type(unet_patcher).__name__}.")
    unet = getattr(getattr(unet_patcher, "model", None), "diffusion_model", None)
    if unet_kind(unet) != LDM:
        applied.notes.append(f"not applied: {type(unet).__name__} is not an SD1.x/SD2.x/SDXL UNet (Flux and SD3 run unchanged)")
        return unet_patcher, _record(applied)
    if opts.cast_on:
        # Forge owns the UNet's storage dtype and moves it between devices itself; a second
        # cast copy would sit outside its memory management. Its own selector does this job.
        applied.notes.append("cast not applied on Forge: choose the UNet dtype with Forge's 'Diffusion in Low Bits' selector")
        opts = replace(opts, dtype=OFF, channels_last=False)
    specs = None
    if (opts.loras_on or opts.lcm_on) and feature_module("lora") is not None:
        specs = lora_specs(opts, lora_dir)  # names checked now: an unknown one fails before sampling
    if opts.deepcache_on and feature_module("deepcache") is not None:
        from ..deepcache import check_depth

        check_depth(unet, deepcache_config(opts))
    m = unet_patcher.clone()
    wrapper = _ForgeWrapper(opts, m.model_options.get("model_function_wrapper"), specs=specs, progress=progress)
    m.set_model_unet_function_wrapper(wrapper)
    if opts.compile_on:
        applied.compile_report = compiled_for(unet, opts.compile_config()).report
    _forge_passes.append(wrapper)
    return m, _record(applied)


# This generation's Forge wrappers (one per sampling pass: hires fix makes two); they hold
# their pass's runner, and through it the UNet, until the generation ends.
_forge_passes: list[_ForgeWrapper] = []


def finish_generation() -> dict:
    """End of a generation on either host: undo A1111's swap, restore fused LoRAs, collect DeepCache stats."""
    runs = []
    while _forge_passes:
        runs += _forge_passes.pop(0).finish()
    A1111.last_deepcache = []
    A1111.undo()
    restore_loras()
    return {"deepcache": runs + A1111.last_deepcache}


# --- the tab ------------------------------------------------------------------------------------------


def bench_config(*, device: str, preset: str, steps: int | None, checkpoint: str | None, rows: str, out_dir: str):
    """The `sd-accel bench` configuration the tab's Benchmark button runs (diffusers host, the loaded checkpoint's file)."""
    from ..bench import BenchConfig

    configs = tuple(r.strip() for r in (rows or "").split(",") if r.strip()) or None
    return BenchConfig(device=device, preset=preset, steps=steps or None, checkpoint=checkpoint, configs=configs, out_dir=out_dir)


def backend_table() -> list[list[str]]:
    """Rows for the tab: backend, available on CUDA, available on CPU, what is missing."""
    from ..optional import INSTALL_HINTS

    rows = []
    for name, b in BACKENDS.items():
        cuda, cpu = b.available("cuda"), b.available("cpu")
        missing = "" if cuda else b.missing("cuda")
        hint = INSTALL_HINTS.get(missing, "") if missing else ""
        rows.append([name, "yes" if cuda else "no", "yes" if cpu else "no", f"{missing}{': ' + hint if hint else ''}"])
    return rows


__all__ = ["WebuiOptions", "UI_FIELDS", "SETTINGS_FIELDS", "BACKEND_CHOICES", "DTYPE_CHOICES", "parse_loras", "format_loras",
           "options_from_args", "with_overrides", "to_infotext", "from_infotext", "infotext_field", "feature_status",
           "compiled_for", "cast_copy_for", "clear_caches", "cache_state", "Applied", "last_applied", "build_runner",
           "is_forge", "a1111_unet", "A1111Patch", "A1111", "apply_forge", "finish_generation", "lora_files", "lora_specs",
           "fuse_loras", "restore_loras", "deepcache_paths", "bench_config", "backend_table"]
