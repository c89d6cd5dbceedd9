"""Warm-up rows for `sd-accel bench --host comfy`: the first compiled run in a fresh process,
without and then with the on-disk compile cache an earlier process left.

Each measurement is its own Python process (compiled code and torch's in-memory caches do not
survive in one process's state) with an empty TORCHINDUCTOR_CACHE_DIR of its own, so the warm
one can only be warm through SD Accel's compile-cache folder:
- cold: an empty compile-cache folder; the run compiles and saves to it;
- warm: a second process with the folder the cold one left.
The child builds the ComfyUI model as `bench.comfy` does, runs ComfyUI eager sampling twice
(the first loads the model onto the device), applies SDAccelCompileUNet and times its first
sampling run (load of the cache, dynamo tracing, inductor or cache hits, CUDA-graph
recording) and the steady run after it. It prints one JSON line.

    python -m sd_accel.cli.bench.warmup --preset tiny      # CPU smoke run (COMFYUI_PATH set)
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from ...accel_core.log import logger
from .measure import BenchConfig, BenchRow

MARK = "SD_ACCEL_WARMUP "
STEADY_RUNS = 8  # runs after the first compiled one; steady = their best
PROFILE_ENV = "SD_ACCEL_WARMUP_PROFILE"  # a folder: each child writes a torch.profiler table of one steady run
COLD = "warm-up: first compiled run, cold (empty compile cache)"
WARM = "warm-up: first compiled run, warm (compile cache of the cold process)"


def run_child(cfg: BenchConfig, cache_dir: str, inductor_dir: str, mode: str = "reduce-overhead", timeout_s: float = 1800) -> dict:
    """One fresh process: {"first_s", "steady_s", "eager_s", "counters", "report", ...}, or {"error": ...}."""
    from ...accel_core import compile_cache
    from .comfy import comfy_root

    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=inductor_dir, COMFYUI_PATH=comfy_root(cfg.comfyui_path))
    env[compile_cache.ENV] = cache_dir
    env.pop("TRITON_CACHE_DIR", None)  # Triton's kernels then live under the fresh inductor folder too
    spec = {"device": cfg.device, "preset": cfg.preset, "steps": cfg.steps, "seed": cfg.seed, "cfg_scale": cfg.cfg_scale, "mode": mode,
            "dynamic_vram": cfg.dynamic_vram,
            "tag": os.path.basename(inductor_dir)}
    cmd = [sys.executable, "-m", f"{__package__}.warmup", "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - t0
    lines = [x for x in p.stdout.splitlines() if x.startswith(MARK)]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {p.returncode}: " + " | ".join(tail)[-400:]}
    rec = json.loads(lines[-1][len(MARK):])
    rec["process_wall_s"] = wall
    return rec


def _row(name: str, rec: dict, steps: int) -> BenchRow:
    if "error" in rec:
        return BenchRow(name, float("nan"), speedup=0.0, steps=steps, note=f"FAILED: {rec['error']}", failed=True, error=rec["error"])
    c = rec["counters"]
    ms = rec["steady_s"] / rec["steps"] * 1000
    later = rec.get("later_runs_s") or []
    settle = f", next runs {later[0]:.2f}..{later[-1]:.2f} s" if later and later[0] > 1.2 * rec["steady_s"] else ""
    note = (f"first compiled run {rec['first_s']:.1f} s (steady {rec['steady_s']:.2f} s{settle}, eager {rec['eager_s']:.2f} s); "
            f"FX graph cache {c['fxgraph_cache_hit']} hit / {c['fxgraph_cache_miss']} miss, "
            f"AOTAutograd {c['autograd_cache_hit']} hit / {c['autograd_cache_miss']} miss / {c.get('autograd_cache_bypass', 0)} bypassed; "
            f"compile cache: {rec['report'].get('cache') or '-'}; process start to end of first compiled run {rec['process_s']:.0f} s")
    return BenchRow(name, ms, speedup=rec["eager_s"] / rec["steady_s"], rel_err=rec["rel_err"], peak_mem_mb=rec.get("peak_mem_mb"),
                    compile_s=max(0.0, rec["first_s"] - rec["steady_s"]), steps=rec["steps"], note=note)


def warmup_rows(cfg: BenchConfig, mode: str = "reduce-overhead", diagnostics: dict | None = None, progress=None,
                timeout_s: float = 1800) -> list[BenchRow]:
    """Cold then warm first compiled run, each in a fresh process; two BenchRows.

    ms/step, speed-up (over ComfyUI eager) and rel err are the child's own, measured side by side
    in that process; compile s = first compiled run - steady run; the note names the first-run
    seconds and the cache hits. `diagnostics` (`ComfyBench.diagnostics`) gets each child's
    record; `progress(name)` is called per row.
    """
    from .comfy import PRESETS

    steps = cfg.steps or PRESETS[cfg.preset].steps
    tmp = tempfile.mkdtemp(prefix="sd_accel_warmup_")
    cache_dir = os.path.join(tmp, "compile_cache")
    rows = []
    try:
        for name, tag in ((COLD, "cold"), (WARM, "warm")):
            if rows and math.isnan(rows[0].ms_per_step):
                rec = {"error": "the cold run failed"}
            else:
                rec = run_child(cfg, cache_dir, os.path.join(tmp, f"inductor-{tag}"), mode, timeout_s)
                from ...accel_core import compile_cache

                rec["cache_files_after"] = len(compile_cache.entries(cache_dir))
                rec["cache_bytes_after"] = sum(e.size for e in compile_cache.entries(cache_dir))
            rows.append(_row(name, rec, steps))
            if diagnostics is not None:
                diagnostics[name] = rec
            logger.info("SD Accel bench: %s: %s", name, rows[-1].note)
            if progress:
                progress(name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


# --- the child process --------------------------------------------------------------------------

def _child(spec: dict) -> dict:
    t_start = time.perf_counter()
    import torch
    from torch._dynamo.utils import counters

    from ...accel_core.hosts.comfy import compile_report
    from .comfy import PRESETS, ComfyBench, our_compile, sync_device, write_profile
    from .measure import rel_err

    cfg = BenchConfig(device=spec["device"], preset=spec["preset"], steps=spec["steps"], seed=spec["seed"], cfg_scale=spec["cfg_scale"],
                      dynamic_vram=spec.get("dynamic_vram", "auto"),
                      host="comfy")
    b = ComfyBench(cfg, PRESETS[cfg.preset])
    bypass = _BypassReasons.install()

    def timed(model):
        t0 = time.perf_counter()
        out = b.sample(model)
        sync_device(b.device)
        return out, time.perf_counter() - t0

    with torch.inference_mode():
        timed(b.model)  # loads the model onto the device, warms the libraries
        ref, eager_s = timed(b.model)
        m = our_compile(b.model, spec["mode"])
        if b.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _, first_s = timed(m)
        process_s = time.perf_counter() - t_start
        # Steady: the best of the runs after it. Not just the next one: in a warm process the runs
        # right after a cache-hit compile are slower for a few seconds (0.33-0.40 s instead of 0.15 s
        # per SD1.5 image on an H200), host-side. It does not happen with TORCHINDUCTOR_COMPILE_THREADS=1
        # (no compile-worker pool); TORCH_WARM_POOL=0 does not remove it.
        later = [timed(m) for _ in range(STEADY_RUNS)]
        out, steady_s = later[-1][0], min(t for _, t in later)
        later_s = [round(t, 3) for _, t in later]
        prof_dir = os.environ.get(PROFILE_ENV)
        diag = {}
        if prof_dir:  # diagnosis: where a steady run's time goes in this process, and whether it changes with time
            write_profile(lambda: timed(m), os.path.join(prof_dir, f"profile_{spec.get('tag', 'child')}.txt"), b.device)
            diag["profiled_later_runs_s"] = [round(timed(m)[1], 3) for _ in range(5)]
            diag["threads"] = sorted(t.name for t in threading.enumerate())
            diag["child_processes"] = _child_processes()
            time.sleep(5)
            diag["after_5s_pause_s"] = [round(timed(m)[1], 3) for _ in range(3)]
    c = {k: counters[g][k] for g, k in (("inductor", "fxgraph_cache_hit"), ("inductor", "fxgraph_cache_miss"),
                                         ("aot_autograd", "autograd_cache_hit"), ("aot_autograd", "autograd_cache_miss"),
                                         ("aot_autograd", "autograd_cache_bypass"))}
    c["graphs"] = counters["stats"]["unique_graphs"]
    c["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    try:  # where the first run's compile time went (dynamo tracing, AOT, inductor or cache load), seconds per phase
        from torch._dynamo.utils import compile_times

        heads, values = compile_times(repr="csv", aggregate=True)
        phases = {h: round(float(v), 2) for h, v in zip(heads, values)}
    except Exception as e:
        phases = {"error": f"{type(e).__name__}: {e}"}
    return {"first_s": first_s, "steady_s": steady_s, "later_runs_s": later_s, "eager_s": eager_s, "steps": b.steps, "process_s": process_s,
            "rel_err": rel_err(out, ref), "counters": c, "compile_phases_s": phases, "report": compile_report(m) or {},
            "peak_mem_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if b.device == "cuda" else None,
            "torch": torch.__version__, "autograd_cache_bypass_reasons": bypass.reasons[:3], **diag}


def _child_processes() -> list[str]:
    try:
        import psutil

        return [" ".join(p.cmdline()[:4])[:120] + f" cpu%={p.cpu_percent(0.2):.0f}" for p in psutil.Process().children(recursive=True)]
    except Exception as e:
        return [f"{type(e).__name__}: {e}"]


class _BypassReasons(logging.Handler):
    """Why AOTAutograd's cache was bypassed (torch logs it at INFO only); this child process only."""

    NAME = "torch._functorch._aot_autograd.autograd_cache"

    def __init__(self):
        super().__init__(logging.INFO)
        self.reasons: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Bypassing"):
            self.reasons.append(" ".join(msg.split())[:300])

    @classmethod
    def install(cls) -> "_BypassReasons":
        h, log = cls(), logging.getLogger(cls.NAME)
        log.addHandler(h)
        log.setLevel(logging.INFO)
        return h


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd_accel.cli.bench.warmup", description=__doc__.splitlines()[0])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--mode", default="reduce-overhead")
    p.add_argument("--comfyui-path", default=None)
    args = p.parse_args(argv)
    if args.child:
        print(MARK + json.dumps(_child(json.loads(args.child))), flush=True)
        return 0
    import torch

    from .measure import BenchResult
    from .comfy import PRESETS

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = BenchConfig(device=args.device, preset=args.preset, steps=args.steps, host="comfy", comfyui_path=args.comfyui_path)
    result = BenchResult(cfg.device, torch.cuda.get_device_name() if cfg.device == "cuda" else f"CPU ({os.cpu_count()} cores)",
                         f"{cfg.preset} (ComfyUI, warm-up rows)", cfg.steps or PRESETS[cfg.preset].steps, torch.__version__)
    diagnostics: dict = {}
    result.rows = warmup_rows(cfg, args.mode, diagnostics)
    print(result.table())
    print(json.dumps(diagnostics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
