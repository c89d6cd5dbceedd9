"""Regional compilation of a DiT model: one compiled callable per block kind, reused by every
identical block.

A DiT model is a stack of identical transformer blocks (Flux.1-dev: 19 double-stream + 38
single-stream). Compiling the whole forward traces all 57; compiling each block kind once and
reusing the callable for every block of that kind makes the first compiled image fast. The
callable takes the block's call as an argument (`original(args)`, the host's own block call,
closure and all): with dynamo's `inline_inbuilt_nn_modules` (default since torch 2.5) a block's
parameters are graph inputs and nothing is guarded on which block it is, so N identical blocks
share one compiled frame. Each kind gets a code object of its own, so two kinds never evict
each other's entries as recompiles. Models whose blocks have the same structure (class,
parameter names, shapes and dtypes) share that callable too: Wan 2.2 14B's high-noise and
low-noise models, two checkpoints of one architecture, a LoRA'd or FP16 Cast copy. The second
model traces nothing the first did not.

A block whose compiled call fails (a conversion error, never an error of the run itself) runs
eager from then on and is named in the report; the others stay compiled.

Blocks compile without CUDA graphs ("reduce-overhead" runs as "default"; compiling.NO_GRAPHS says
why). Flux's blocks hid the reason: they add into their input in place, for which inductor skips
graphs anyway. A DiT block is a few large kernels, where graphs save little. The host decides which
calls reach `run` (ComfyUI: hosts/comfy/regional.py, through `patches_replace["dit"]`, which
ComfyUI's NextDiT offers through the BlockHooks of families/hooks.py).
"""
from __future__ import annotations

import contextlib
import functools
import time
import types
import weakref
from typing import Callable

import torch
from torch import nn

from . import events
from .backends import BACKENDS, resolve
from .compiling import (NO_GRAPHS, CompileConfig, CompileReport, DiskCacheUser, is_run_error, roomy_recompile_limit, short_error,
                        without_graphs)
from .families import Family, describe, module_dtype
from .families.hooks import routed, unwrap
from .log import logger


def _run_block(original, args):
    return original(args)


def _runner(label: str) -> Callable:
    """A function like `_run_block` with a code object of its own (dynamo keeps its cache per code object)."""
    code = _run_block.__code__.replace(co_name=label)
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=label)
    return types.FunctionType(code, _run_block.__globals__, label)


class SharedBlocks:
    """(block structure, device, config) -> the compiled callable every model with such blocks uses. Weak: an
    entry goes with the last RegionalCompiled that holds it (and dynamo's cache with its code object).
    One registry object: SHARED_BLOCKS."""

    def __init__(self):
        self._by_key: "weakref.WeakValueDictionary[tuple, Callable]" = weakref.WeakValueDictionary()

    def get(self, key: tuple, make: Callable[[str], Callable]) -> Callable:
        fn = self._by_key.get(key)
        if fn is None:
            fn = self._by_key[key] = make(f"sd_accel_block_{len(self._by_key)}")
        return fn

    def __len__(self) -> int:
        return len(self._by_key)


SHARED_BLOCKS = SharedBlocks()


def _structure(block: nn.Module) -> tuple:
    """What dynamo's guards on a block's tensors see (its class, tensor names, shapes, dtypes): blocks
    alike in these run one compiled callable without a recompile, whichever model they belong to."""
    cls = type(block)
    return (cls.__module__, cls.__qualname__, block.training,
            tuple((n, tuple(t.shape), t.dtype) for n, t in (*block.named_parameters(), *block.named_buffers())))


class RegionalCompiled(DiskCacheUser):
    """One model's blocks, compiled per block kind. Lives on the model (registry), shared by its clones."""

    def __init__(self, module: nn.Module, family: Family, config: CompileConfig):
        if config.mode in NO_GRAPHS:  # see the module doc
            logger.info("SD Accel Compile: DiT blocks compile one by one, without CUDA graphs (%s runs as %s).",
                        config.mode, NO_GRAPHS[config.mode])
        self.config = config = without_graphs(config)
        self._device = module_dtype(module).device
        backend = resolve(config.backend, self._device.type)
        if backend.name != "inductor":  # onediff / stable-fast convert whole modules, not a block call
            logger.info("SD Accel Compile: %s compiles whole UNets; DiT blocks are compiled with inductor (torch.compile).", backend.name)
            backend = BACKENDS["inductor"]
        self.backend = backend
        self.keep = KEEP + family.block_options  # the transformer_options a compiled block is handed
        groups = family.regions(module)
        # (patch name, index) -> (kind, block name): what a host may route here.
        self.targets: dict[tuple[str, int], tuple[str, str]] = {}
        for bl, mods in family.block_lists(module):
            if bl.patch is None:
                continue
            for i, block in enumerate(mods):
                self.targets[(bl.patch, i)] = (f"{bl.attr}:{type(unwrap(block)).__name__}", f"{bl.attr}.{i}")
        self.kinds = sorted({k for k, _ in self.targets.values()})
        self._shared_keys = {k: (_structure(groups[k][0][1]), self._device.type, backend.name, config) for k in self.kinds}
        n = sum(len(groups[k]) for k in self.kinds)
        self.report = CompileReport(config.backend, backend.name, config.mode,
                                    f"{describe(module)} [regional: {n} blocks in {len(self.kinds)} kinds]")
        self._compiled: dict[str, Callable] = {}
        self._first_done: set[str] = set()
        self.failed: dict[str, str] = {}
        self._announced = False
        self._noted: set[tuple] = set()

    @contextlib.contextmanager
    def calling(self):
        """Around one model call: announce and load the disk cache once, room for shape recompiles, save new graphs."""
        if not self._announced:
            self._announced = True
            events.emit("compile_start", backend=self.backend.name, mode=self.config.mode, target=self.report.target)
            self._load_cache()
        with roomy_recompile_limit():
            yield
        self._save_cache()

    def run(self, kind: str, name: str, original: Callable, args: dict, eager_args: dict | None = None):
        """Block `name` of `kind`: `original(args)` through the kind's compiled callable, or eager
        (`original(eager_args or args)`) for a block that failed to compile."""
        if name in self.failed:
            return original(eager_args if eager_args is not None else args)
        fn = self._compiled.get(kind)
        first = kind not in self._first_done
        t0 = time.perf_counter()
        try:
            if fn is None:
                fn = self._compiled[kind] = self._shared(kind)
            out = fn(original, args)
        except Exception as e:
            if is_run_error(e) or not self.config.fallback:
                raise
            self.report.compile_seconds += time.perf_counter() - t0
            out = original(eager_args if eager_args is not None else args)  # raises if the inputs themselves are bad
            self._on_failure(name, e)
            return out
        if first:
            self._first_done.add(kind)
            self.report.compile_seconds += time.perf_counter() - t0
            self.report.units_compiled += 1
            self._settle()
        return out

    def note_eager(self, patches: list[str]):
        """Once per set of patches: blocks of calls that carry patches inside the blocks run uncompiled."""
        key = tuple(patches)
        if key not in self._noted:
            self._noted.add(key)
            logger.info("SD Accel Compile: another node patches the attention inside the blocks (%s, e.g. ComfyUI's Flux KV "
                        "Cache); the blocks of such calls run as ComfyUI's own code, uncompiled.", ", ".join(patches))

    def _shared(self, kind: str) -> Callable:
        """The compiled callable of block kind `kind`: the one models with the same blocks already use, or a new one."""
        return SHARED_BLOCKS.get(self._shared_keys[kind], lambda label: self.backend.compile(_runner(label), None, self.config))

    def _on_failure(self, name: str, e: Exception):
        self.failed[name] = self.report.fallbacks[name] = short_error(e)
        logger.warning("SD Accel Compile: block %s did not compile (%s); it runs eager, the other blocks stay compiled.", name, self.failed[name])
        self._settle()

    def _settle(self):
        if self.failed:
            self.report.status = "partial" if self._first_done else "eager"
        elif self._first_done >= set(self.kinds):
            self.report.status = "compiled"
        else:
            return
        events.emit("compile_end", report=self.report.to_dict())
        logger.info("SD Accel: compiled %s", self.report.summary())


# --- routing a host's blocks here ---------------------------------------------------------------
# ComfyUI's DiT forwards and Forge Neo's (ComfyUI-derived) ones offer block i to
# `transformer_options["patches_replace"]["dit"][(name, i)]`. The compiled block gets a
# transformer_options holding only what blocks read (`optimized_attention_override`, and the
# family's `block_options`: LTX-2's switches, which ComfyUI's STG and modality guidance set for
# some calls or blocks, each setting met traced once): dynamo guards on what it reads, and the
# host's dict changes per block (block_index) and per run.
# When the run has patches that the blocks themselves call (attn1_patch, ...), blocks run as
# the host's own code for that call.

KEEP = ("optimized_attention_override",)
INNER_PATCHES = ("attn1_patch", "attn1_output_patch", "attn2_patch", "attn2_output_patch")


def _contiguous(v):
    if isinstance(v, torch.Tensor):
        return v.contiguous()
    if isinstance(v, tuple) and v and all(isinstance(t, torch.Tensor) for t in v):  # LTX-2's (video, audio) img
        return tuple(t.contiguous() for t in v)
    return v


class _Block:
    """One `patches_replace["dit"]` entry for one call: the block through its kind's compiled callable."""

    __slots__ = ("rc", "kind", "name", "prev")

    def __init__(self, rc, kind, name, prev):
        self.rc, self.kind, self.name, self.prev = rc, kind, name, prev

    def __call__(self, args, extra):
        original = extra["original_block"]
        if self.prev is not None:  # another pack's replacement: it decides, our compiled block is its original
            return self.prev(args, {**extra, "original_block": functools.partial(self._run, original)})
        return self._run(original, args)

    def _run(self, original, args):
        to = args.get("transformer_options") or {}
        patches = to.get("patches") or {}
        inner = [k for k in INNER_PATCHES if patches.get(k)]
        if inner:
            self.rc.note_eager(inner)
            return original(args)
        # Contiguous inputs: the first block often gets a transposed view (Wan's patch embedding),
        # the others contiguous outputs; dynamo guards on strides, so one frame serves all only so.
        slim = {k: _contiguous(v) for k, v in args.items()}
        slim["transformer_options"] = {k: to[k] for k in self.rc.keep if k in to}
        return self.rc.run(self.kind, self.name, original, slim, args)


def with_blocks(to: dict, rc: RegionalCompiled) -> dict:
    """A copy of a call's transformer_options whose `patches_replace["dit"]` routes every block of `rc` through its compiled callable."""
    to = dict(to)
    replace = dict(to.get("patches_replace") or {})
    dit = dict(replace.get("dit") or {})
    for key, (kind, name) in rc.targets.items():
        dit[key] = _Block(rc, kind, name, dit.get(key))
    replace["dit"] = dit
    to["patches_replace"] = replace
    return to


def is_regional(family: Family | None, module: nn.Module, hooks: bool = False) -> bool:
    """Whether the host can route `module`'s blocks through a regional compile (a hook per block);
    `hooks`: the host puts BlockHooks in place where the forward offers no hook (families/hooks.py)."""
    return family is not None and any(routed(bl, module, hooks) for bl, _ in family.block_lists(module))


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process (for reports and tests)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


__all__ = ["RegionalCompiled", "is_regional", "dynamo_graphs", "with_blocks", "KEEP", "INNER_PATCHES"]
