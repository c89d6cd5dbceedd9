"""Regional compilation of a DiT model: one compiled callable per block kind, reused by every
identical block.

A DiT model is a stack of identical transformer blocks (Flux.1-dev: 19 double-stream + 38
single-stream). Compiling the whole forward traces all 57; compiling each block kind once and
reusing the callable for every block of that kind makes the first compiled image fast. The
callable takes the block's call as an argument (`original(args)`, the host's own block call,
closure and all): with dynamo's `inline_inbuilt_nn_modules` (default since torch 2.5) a block's
parameters are graph inputs and nothing is guarded on which block it is, so N identical blocks
share one compiled frame. Each kind gets a code object of its own, so two kinds never evict
each other's entries as recompiles.

A block whose compiled call fails (a conversion error, never an error of the run itself) runs
eager from then on and is named in the report; the others stay compiled. The host decides which
calls reach `run` (ComfyUI: hosts/comfy_regional.py, through `patches_replace["dit"]`).
"""
from __future__ import annotations

import contextlib
import time
import types
from typing import Callable

from torch import nn

from . import events
from .backends import BACKENDS, resolve
from .compile import CompileConfig, CompileReport, DiskCacheUser, is_run_error, roomy_recompile_limit, short_error
from .families import Family, describe, module_dtype
from .log import logger


def _run_block(original, args):
    return original(args)


def _runner(label: str) -> Callable:
    """A function like `_run_block` with a code object of its own (dynamo keeps its cache per code object)."""
    code = _run_block.__code__.replace(co_name=label)
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=label)
    return types.FunctionType(code, _run_block.__globals__, label)


class RegionalCompiled(DiskCacheUser):
    """One model's blocks, compiled per block kind. Lives on the model (registry), shared by its clones."""

    def __init__(self, module: nn.Module, family: Family, config: CompileConfig):
        self.config = config
        self._device = module_dtype(module).device
        backend = resolve(config.backend, self._device.type)
        if backend.name != "inductor":  # onediff / stable-fast convert whole modules, not a block call
            logger.info("SD Accel Compile: %s compiles whole UNets; DiT blocks are compiled with inductor (torch.compile).", backend.name)
            backend = BACKENDS["inductor"]
        self.backend = backend
        groups = family.regions(module)
        # (patch name, index) -> (kind, block name): what a host may route here.
        self.targets: dict[tuple[str, int], tuple[str, str]] = {}
        for bl, mods in family.block_lists(module):
            if bl.patch is None:
                continue
            for i, block in enumerate(mods):
                self.targets[(bl.patch, i)] = (f"{bl.attr}:{type(block).__name__}", f"{bl.attr}.{i}")
        self.kinds = sorted({k for k, _ in self.targets.values()})
        n = sum(len(groups[k]) for k in self.kinds)
        self.report = CompileReport(config.backend, backend.name, config.mode,
                                    f"{describe(module)} [regional: {n} blocks in {len(self.kinds)} kinds]")
        self._compiled: dict[str, Callable] = {}
        self._first_done: set[str] = set()
        self.failed: dict[str, str] = {}
        self._announced = False

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
                fn = self._compiled[kind] = self.backend.compile(_runner(f"sd_accel_block_{len(self._compiled)}"), None, self.config)
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


def is_regional(family: Family | None, module: nn.Module) -> bool:
    """Whether the host can route `module`'s blocks through a regional compile (a hook per block)."""
    return family is not None and any(bl.patch for bl, _ in family.block_lists(module))


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process (for reports and tests)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


__all__ = ["RegionalCompiled", "is_regional", "dynamo_graphs"]
