"""`run_bench`: every suite in one process, then bench.json and bench.png in the output folder.

bench.json is rewritten after every row, so a run that stops part-way leaves the rows it
finished; failed rows carry `"failed": true` and their error, and `"complete"` says whether the
run got to the end.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import asdict
from typing import Callable, Iterator

import torch

from ...accel_core.errors import SDAccelError
from .capture import captured
from .chart import write_chart
from .measure import (CPU_DEFAULT_PREFIXES, CPU_DEFAULT_ROWS, BenchConfig, BenchContext, BenchResult, available_cores, busy_reason,
                      check_configs, default_threads, failed_row)
from .models import PRESETS
from .suites import SUITES, baseline_name, row_names


def bench_config(*, device: str, preset: str, steps: int | None, checkpoint: str | None, rows: str, out_dir: str) -> BenchConfig:
    """The configuration the webui tab's Benchmark button runs (diffusers host, the loaded checkpoint's file)."""
    configs = tuple(r.strip() for r in (rows or "").split(",") if r.strip()) or None
    return BenchConfig(device=device, preset=preset, steps=steps or None, checkpoint=checkpoint, configs=configs, out_dir=out_dir)


def _catalogue(cfg: BenchConfig) -> list[str]:
    if cfg.host == "comfy":
        from .comfy_rows import row_names as comfy_row_names

        return comfy_row_names(cfg)
    return row_names(cfg.device, cfg.cfg_scale)


def check_rows(cfg: BenchConfig) -> list[str]:
    """--configs against the rows this host and device can measure (before anything is loaded);
    returns the rows the run will measure, about (for the progress bar)."""
    _check_out(cfg.out_dir)
    names = _catalogue(cfg)
    check_configs(cfg.configs, names)
    if cfg.configs:
        return [n for i, n in enumerate(names) if i == 0 or n.startswith(cfg.configs)]
    if cfg.host == "comfy":
        return [n for n in names if not n.startswith("exp")]
    if cfg.device == "cpu":
        return [n for n in names if n.startswith(CPU_DEFAULT_PREFIXES) or n in CPU_DEFAULT_ROWS]
    return names


def _check_out(folder: str):
    """Before anything is loaded (and without creating it yet): --out must be a folder this process can write."""
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)  # the folder is created later, inside its nearest existing parent
    why = "it is not a folder" if not os.path.isdir(path) else ("this process may not write there" if not os.access(path, os.W_OK | os.X_OK) else "")
    if not why:  # os.access says yes to root everywhere, /proc included: make (and remove) a folder to be sure
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".sd-accel-probe-", dir=path))
        except OSError as e:
            why = f"no folder can be made there ({e.strerror or e})"
    if why:
        raise SDAccelError(f"SD Accel bench: --out {folder!r} cannot hold bench.json and bench.png: {why} ({path}). "
                           "Expected a writable folder (it is created if missing); give another --out.")


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


@contextlib.contextmanager
def pinned_threads(n: int):
    """torch's CPU thread count fixed for the run (the caller's restored after): rows compare like with like."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(prev)


class _DiffusersSession:
    """The diffusers host: a diffusers UNet in our own sampling loop, the suites of suites.py."""

    def __init__(self, cfg: BenchConfig, progress):
        self.cfg, self.ctx = cfg, BenchContext(cfg, PRESETS[cfg.preset], progress)
        name = torch.cuda.get_device_name() if cfg.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
        self.result = BenchResult(cfg.device, name, cfg.preset, self.ctx.steps, torch.__version__)
        self.extra: dict = {"host": "diffusers"}

    def rows(self) -> Iterator:
        for suite in SUITES:
            try:
                yield from (r for r in suite(self.ctx) if r is not None)
            except Exception as e:  # outside ctx.measure (setup of a suite): the suite's rows are lost, not the run
                if self.ctx.baseline is None:
                    yield failed_row(baseline_name(self.cfg.device), self.ctx.steps, e)
                    raise
                yield self.ctx.done(failed_row(f"{suite.__name__} (its remaining rows)", self.ctx.steps, e))


def write_json(result: BenchResult, cfg: BenchConfig, extra: dict):
    def clean(v):  # NaN (a failed row's time) is not JSON
        return None if isinstance(v, float) and not math.isfinite(v) else v

    data = {**{k: v for k, v in asdict(result).items() if k != "rows"}, "failed": result.failed, "config": asdict(cfg), **extra,
            "rows": [{**{k: clean(v) for k, v in asdict(r).items()}, "spread": r.spread} for r in result.rows]}
    tmp = result.json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, result.json_path)  # a reader never sees half a file


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Run every suite (or the ComfyUI rows for host "comfy"); write bench.json and bench.png into cfg.out_dir.

    Library warnings are held back and listed in `result.warnings`; torch's thread count is pinned
    for the run and restored after.
    """
    check_rows(cfg)
    _check_out(cfg.out_dir)
    load_start = _load()
    with pinned_threads(cfg.threads or default_threads()) as threads, captured() as caught:
        if cfg.host == "comfy":
            from .comfy_rows import ComfySession

            session = ComfySession(cfg, progress)
        else:
            session = _DiffusersSession(cfg, progress)
        os.makedirs(cfg.out_dir, exist_ok=True)
        result = session.result
        result.repeats, result.threads, result.cores, result.load_avg_start = cfg.repeats, threads, available_cores(), load_start
        result.json_path = os.path.join(cfg.out_dir, "bench.json")
        try:
            for row in session.rows():
                result.rows.append(row)
                write_json(result, cfg, session.extra)
            result.complete = True
        except BaseException as e:  # the rows so far stay in bench.json, marked incomplete
            result.error = f"{type(e).__name__}: {e}"[:500]
            result.warnings = caught.summary()
            write_json(result, cfg, session.extra)
            if isinstance(e, Exception) and not isinstance(e, SDAccelError) and all(r.failed for r in result.rows):
                raise SDAccelError(f"SD Accel bench: the baseline row failed ({result.error}); nothing to compare with. "
                                   f"Expected a UNet that samples on {cfg.device}; see the error, and {result.json_path}.") from e
            raise
    result.load_avg_end = _load()
    result.warnings = caught.summary()
    result.busy_reason = busy_reason(load_start if cfg.device == "cpu" else None, available_cores(), result.rows)
    result.busy = bool(result.busy_reason)
    if any(not r.failed for r in result.rows):
        result.png_path = write_chart(result, os.path.join(cfg.out_dir, "bench.png"))
    write_json(result, cfg, session.extra)
    return result


__all__ = ["run_bench", "bench_config", "check_rows", "pinned_threads", "write_json"]
