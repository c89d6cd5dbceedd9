"""Compile a UNet with one of the backends, block by block where the whole will not convert.

`compile(module, CompileConfig(...))` returns a `CompiledUNet`: a callable with the same
signature as the module's entry method. Conversion happens lazily on the first call. If
the backend fails on the whole UNet (data-dependent control flow, boolean-mask indexing, a
submodule whose forward was replaced by a closure, a builtin the tracer cannot follow), the
holder compiles the UNet's blocks one by one, keeps the failing ones eager (trying one
level finer inside them), and records what happened in `CompiledUNet.report`. A conversion
failure never fails the user's run: the eager result of that call is returned instead.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from . import events
from .backends import BACKENDS, CHOICES, resolve
from .errors import SDAccelError, check_flag, choice_error
from .log import logger
from .options import check_declared, option
from .families import compile_units, describe, module_dtype, split_unit

MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
# Units compiled one by one (a DiT's blocks; a UNet's blocks where the whole would not compile) run without
# CUDA graphs: torch's graph trees free a compiled call's outputs at the next compiled call, and one unit's
# output is the next unit's input (pytorch/pytorch#152887: `y = f(x); z = f(y)` fails).
NO_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
GUARDS = ("full", "skip-module")
MAX_SPLIT_DEPTH = 3
_MISSING = object()


@dataclass(frozen=True)
class CompileConfig:
    """What to compile with (the user-facing options are declared with their help below).

    Args (internal):
        fallback: compile block by block when the whole fails (off: the failure is raised).
        method: the entry method of the module to compile ("forward"; ComfyUI's UNetModel
            uses "_forward", the body inside its wrapper chain).
        torch_backend: the dynamo backend behind "inductor" ("eager"/"aot_eager" for tests).
        cache_dir: folder where torch.compile's caches persist between processes (inductor only;
            see compile_cache). None: the default folder, $SD_ACCEL_COMPILE_CACHE or else
            ~/.cache/sd_accel/compile_cache (hosts fill in their own); "off": no persistence.
        guards: "full" (dynamo's own) or "skip-module" (inductor: drop dynamo's guards on the
            UNet's modules and weights, about 13,000 on SD1.5 and ~1 ms per call, checked while
            the GPU waits; then a monkeypatched forward, a replaced submodule, a changed module
            attribute or a lowvram change made after compiling goes unnoticed: opt-in, for
            fixed pipelines).
        channels_last: before the first call, store the module's 4-D weights NHWC (in place: the
            values stay, only the layout changes) and feed the entry NHWC input, so the compiled
            convolutions need no layout copies of their weights on every call. For a UNet the
            host owns (a copy of its own), since every user of the module sees the new layout.
    """

    backend: str = option("auto", "auto picks the best installed: stable-fast, onediff, then inductor.", label="Compile backend", choices=CHOICES,
                          # the webui's accordion starts with compile off
                          hosts={"webui": {"default": "off", "choices": ("off", *CHOICES)}})
    mode: str = option("default", "reduce-overhead adds CUDA graphs to UNets (the fastest; one graph per resolution and batch size); default: "
                       "no CUDA graphs; max-autotune takes minutes to compile. DiT models (Flux, Wan, ...) compile block by block, without "
                       "CUDA graphs in any mode. On the CPU there are no CUDA graphs, so reduce-overhead equals default.",
                       label="Compile mode", choices=MODES,
                       # a ComfyUI graph samples one size over and over: CUDA graphs pay there from the start
                       hosts={"comfy": {"default": "reduce-overhead"}})
    dynamic: bool | None = option(False, "Compile for varying sizes at once (fewer recompiles, slightly slower kernels).", label="Dynamic shapes")
    fullgraph: bool = option(False, "Require one graph per compiled unit; failures fall back block by block.", label="Full graph")
    fallback: bool = True
    method: str = "forward"
    torch_backend: str = "inductor"
    cache_dir: str | None = None
    guards: str = "full"
    channels_last: bool = False

    def __post_init__(self):
        check_declared(self, "compile")
        if self.guards not in GUARDS:
            raise choice_error("guards", self.guards, GUARDS)
        if not (self.dynamic is None or isinstance(self.dynamic, bool)):
            raise SDAccelError(f"SD Accel compile: dynamic must be True, False or None, found {self.dynamic!r}. "
                               "Use False (specialise on shapes: fastest) or None (let torch decide when sizes change).")
        check_flag("compile", "fullgraph", self.fullgraph, "Use False unless you want one graph or an error.")
        check_flag("compile", "fallback", self.fallback, "Use True: blocks that do not compile stay eager.")
        check_flag("compile", "channels_last", self.channels_last, "Use True only on a UNet copy the host owns, else False.")
        if not isinstance(self.method, str) or not self.method.isidentifier():
            raise SDAccelError(f"SD Accel compile: method must be the name of the module's entry method, found {self.method!r}. Use \"forward\".")
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise SDAccelError(f"SD Accel compile: cache_dir must be a folder path (str) or None, found {self.cache_dir!r}. Pass str(path), None (the default folder) or 'off'.")


@dataclass
class CompileReport:
    requested: str
    backend: str
    mode: str
    target: str
    status: str = "pending"  # pending -> compiled | partial | eager
    compile_seconds: float = 0.0
    units_compiled: int = 0
    whole_error: str | None = None
    fallbacks: dict[str, str] = field(default_factory=dict)
    cache: str = ""  # the on-disk compile cache: what was loaded from it and saved to it
    graph_breaks: dict[str, int] = field(default_factory=dict)  # dynamo's, at the first whole call: reason -> count

    def summary(self) -> str:
        head = f"{self.backend} ({self.mode}) on {self.target}: {self.status}"
        if self.compile_seconds:
            head += f", first call {self.compile_seconds:.1f}s"
        if self.whole_error:
            head += f"; whole UNet did not convert ({self.whole_error}); {self.units_compiled} blocks compiled"
        if self.graph_breaks:
            n = sum(self.graph_breaks.values())
            top = sorted(self.graph_breaks.items(), key=lambda kv: -kv[1])[:2]
            head += f"; {n} graph break(s), the code between them runs eager: " + "; ".join(f"{r[:120]} (x{c})" for r, c in top)
        if self.fallbacks:
            head += "; kept eager: " + "; ".join(f"{k} ({v})" for k, v in self.fallbacks.items())
        if self.cache:
            head += f"; compile cache: {self.cache}"
        return head

    def to_dict(self) -> dict:
        return asdict(self)


def _graph_breaks() -> dict[str, int]:
    """Dynamo's graph breaks so far in this process, by reason (counted only where dynamo traces)."""
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first[:160]}"


def is_run_error(e: BaseException) -> bool:
    """Errors that are about this run, not about conversion: never swallow them."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or type(e).__name__ in ("InterruptProcessingException",)


def without_graphs(config: CompileConfig) -> CompileConfig:
    """`config` in its mode without CUDA graphs (see NO_GRAPHS)."""
    return replace(config, mode=NO_GRAPHS[config.mode]) if config.mode in NO_GRAPHS else config


class _Guarded:
    """One callable (the whole entry, or one unit's forward) that tries the compiled path and
    falls back to eager for good when the compiled path fails and eager succeeds."""

    def __init__(self, holder: "CompiledUNet", name: str, eager: Callable, owner: nn.Module, depth: int):
        self.holder, self.name, self.eager, self.owner, self.depth = holder, name, eager, owner, depth
        self.compiled = None
        self.state = "pending"  # pending | compiled | failed

    def __call__(self, *args, **kwargs):
        if self.state == "failed":
            return self.eager(*args, **kwargs)
        first = self.state == "pending"
        breaks = _graph_breaks() if first and self is self.holder._whole else None
        t0 = time.perf_counter()
        try:
            if self.compiled is None:
                self.compiled = self.holder.backend.compile(self.eager, self.owner, self.holder.config if self is self.holder._whole
                                                            else without_graphs(self.holder.config))
            out = self.compiled(*args, **kwargs)
        except Exception as e:
            if is_run_error(e) or not self.holder.config.fallback:
                raise
            # A failed conversion still cost time (tracing up to the failure): count it.
            self.holder.report.compile_seconds += time.perf_counter() - t0
            out = self.eager(*args, **kwargs)  # raises if the inputs themselves are bad
            self.state = "failed"
            self.holder._on_failure(self, e)
            return out
        if first:
            self.state = "compiled"
            if breaks is not None:  # a break splits the traced code into graphs with eager Python between them
                after = _graph_breaks()
                self.holder.report.graph_breaks = {r: n - breaks.get(r, 0) for r, n in after.items() if n > breaks.get(r, 0)}
            self.holder._on_compiled(self, time.perf_counter() - t0)
        return out


class DiskCacheUser:
    """The on-disk compile cache for a holder of compiled code (inductor only: onediff and
    stable-fast keep their own). Needs `config`, `backend`, `report` and `_device` on the holder."""

    _graphs_seen: int | None = None  # dynamo's graph count at the last cache save (None: no cache)
    _cache_loaded = ""
    _cache_path = ""  # the folder the caches persist in (resolved at the first compiled call)

    def _load_cache(self):
        if self.backend.name != "inductor" or self.config.torch_backend != "inductor":
            return
        from . import compile_cache

        path = self.config.cache_dir
        if path is None:  # persisted by default, as in the hosts; $SD_ACCEL_COMPILE_CACHE=off gives None here
            path = compile_cache.default_cache_dir(None)
        if not path or path.lower() in compile_cache.OFF_VALUES:
            return
        self._cache_path = path
        self._cache_loaded = compile_cache.load(path, self._device).describe()
        self.report.cache = self._cache_loaded
        self._graphs_seen = compile_cache.graphs_compiled()

    def _save_cache(self):
        if self._graphs_seen is None:
            return
        from . import compile_cache

        now = compile_cache.graphs_compiled()
        if now == self._graphs_seen:  # nothing compiled since the last save: the common, per-step case
            return
        self._graphs_seen = now
        res = compile_cache.save(self._cache_path, self._device, config=self.config)
        if res.path or res.error:
            self.report.cache = f"{self._cache_loaded}; {res.describe()}"


class CompiledUNet(DiskCacheUser):
    """Holder for one module's compiled entry and its fallback state.

    Survives ComfyUI's clone (it lives in a wrapper closure, never in model_options) and is
    shared by every clone of the same model. Call it like the module's entry method.
    """

    def __init__(self, module: nn.Module, config: CompileConfig, entry: Callable | None = None, name: str = ""):
        self.module_ref = module
        self.config = config
        md = module_dtype(module)
        self._device = md.device
        self.backend = resolve(config.backend, md.device.type)
        self.report = CompileReport(config.backend, self.backend.name, config.mode, describe(module) + (f" [{name}]" if name else ""))
        if entry is None:
            method = getattr(type(module), config.method, None)
            if method is None:
                raise SDAccelError(f"SD Accel: {type(module).__name__} has no method {config.method!r} to compile; expected a UNet forward. The model was left unchanged.")
            entry = method.__get__(module)
        # `entry` is any callable running `module`'s submodules (the UNet forward, or a
        # partial path such as DeepCache's shallow one); fallback units are `module`'s blocks.
        self._entry_eager = entry
        self._published = (0, 0)
        self._whole = _Guarded(self, "<whole>", self._entry_eager, module, 0)
        self._units: list[tuple[nn.Module, _Guarded]] = []
        self._blockwise = False
        self._announced = False

    # -- calling -------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if not self._announced:
            self._announced = True
            events.emit("compile_start", backend=self.backend.name, mode=self.config.mode, target=self.report.target)
            self._load_cache()
            if self.config.channels_last:
                _weights_channels_last(self.module_ref)
        if self.config.channels_last and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
        if not self._blockwise:
            with roomy_recompile_limit():
                out = self._whole(*args, **kwargs)
            self._save_cache()  # a recompile (new resolution, batch) compiled something new
            return out
        with self._units_installed(), roomy_recompile_limit():
            out = self._entry_eager(*args, **kwargs)
        self._settle()
        return out

    @contextlib.contextmanager
    def _units_installed(self):
        saved = []
        try:
            for module, guard in self._units:
                if guard.state == "split":
                    continue
                saved.append((module, module.__dict__.get("forward", _MISSING)))
                module.forward = guard
            yield
        finally:
            for module, prev in reversed(saved):
                if prev is _MISSING:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = prev

    # -- bookkeeping called by the guards ---------------------------------------------
    def _on_compiled(self, guard: _Guarded, seconds: float):
        self.report.compile_seconds += seconds
        if guard is self._whole:
            self.report.status = "compiled"
            self._save_cache()
            events.emit("compile_end", report=self.report.to_dict())
            (logger.warning if self.report.graph_breaks else logger.info)("SD Accel: compiled %s", self.report.summary())
        else:
            self.report.units_compiled += 1
            self._progress(guard.name)

    def _on_failure(self, guard: _Guarded, e: Exception):
        if guard is self._whole:
            self.report.whole_error = short_error(e)
            self._blockwise = True
            self._units = [(m, _Guarded(self, n, m.forward, m, 1)) for n, m in compile_units(self.module_ref)]
            logger.warning("SD Accel: %s could not compile the whole UNet (%s); compiling it block by block.", self.backend.name, self.report.whole_error)
            self._progress("<whole>")
            return
        children = split_unit(guard.name, guard.owner) if guard.depth < MAX_SPLIT_DEPTH else []
        self.report.fallbacks[guard.name] = short_error(e)
        if children:
            guard.state = "split"  # the unit's own code runs eager; its children get their own chance
            self.report.fallbacks[guard.name] += f" [its {len(children)} submodules compiled separately]"
            self._units.extend((m, _Guarded(self, n, m.forward, m, guard.depth + 1)) for n, m in children)
        self._progress(guard.name)

    def _progress(self, unit: str):
        # Blockwise compilation can take minutes; tell listeners (the ComfyUI badge) how far it is.
        tried = sum(1 for _, g in self._units if g.state != "pending")
        events.emit("compile_progress", target=self.report.target, unit=unit, done=tried, total=len(self._units),
                    whole_error=self.report.whole_error)

    def _settle(self):
        """After a blockwise call: publish the report when what was compiled or kept eager changed."""
        self._save_cache()
        now = (self.report.units_compiled, len(self.report.fallbacks))
        if now == self._published:
            return
        self._published = now
        self.report.status = "partial" if self.report.units_compiled else "eager"
        logger.warning("SD Accel: %s", self.report.summary())
        events.emit("fallback", report=self.report.to_dict())


def _weights_channels_last(module: nn.Module):
    # Once, before the first compile. Moving the module between devices keeps the layout
    # (Tensor.to preserves it); a weight replaced later by an NCHW tensor costs one recompile
    # (dynamo guards on strides), never a wrong result.
    # Normal tensors even inside the host's inference mode: later in-place LoRA updates may run outside it.
    with torch.inference_mode(False), torch.no_grad():
        for p in module.parameters():
            if p.dim() == 4 and p.is_floating_point() and not p.is_contiguous(memory_format=torch.channels_last):
                p.data = p.data.clone(memory_format=torch.channels_last)


@contextlib.contextmanager
def roomy_recompile_limit():
    # Blockwise compilation compiles one code object (ResBlock.forward, ...) for many
    # instances and shapes, and a specialised (dynamic=False) whole UNet gets one entry per
    # resolution x batch; dynamo's default limit of 8 would silently leave the rest eager.
    # Scoped to our call, so nothing process-wide changes.
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096):
        yield


def compile(module: nn.Module, config: CompileConfig | None = None, *, entry: Callable | None = None, name: str = "") -> CompiledUNet:
    """Compile `module` (lazily, on first call) with per-submodule fallback.

    Example:
        >>> cu = compile(unet, CompileConfig(backend="inductor", mode="reduce-overhead"))
        >>> out = cu(sample, t, encoder_hidden_states=ctx)   # same call as unet(...)
        >>> print(cu.report.summary())

    `entry` compiles another callable over `module`'s blocks instead of its forward (DeepCache
    compiles its shallow path this way, with the same config and fallback).
    """
    if not isinstance(module, nn.Module):
        raise SDAccelError(f"SD Accel: expected a torch nn.Module (a UNet) to compile, found {type(module).__name__}. Connect a MODEL output to the node.")
    return CompiledUNet(module, config or CompileConfig(), entry=entry, name=name)


__all__ = ["CompileConfig", "CompileReport", "CompiledUNet", "DiskCacheUser", "compile", "roomy_recompile_limit", "is_run_error", "short_error", "MODES", "BACKENDS"]
