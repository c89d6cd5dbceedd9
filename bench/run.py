"""`run_bench`: every suite in one process, then bench.json and bench.png in the output folder."""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Callable

import torch

from .chart import write_chart
from .measure import BenchConfig, BenchContext, BenchResult
from .models import PRESETS
from .suites import SUITES


def bench_config(*, device: str, preset: str, steps: int | None, checkpoint: str | None, rows: str, out_dir: str) -> BenchConfig:
    """The configuration the webui tab's Benchmark button runs (diffusers host, the loaded checkpoint's file)."""
    configs = tuple(r.strip() for r in (rows or "").split(",") if r.strip()) or None
    return BenchConfig(device=device, preset=preset, steps=steps or None, checkpoint=checkpoint, configs=configs, out_dir=out_dir)


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Run every suite; write JSON and a PNG chart into cfg.out_dir."""
    if cfg.host == "comfy":
        from .comfy_rows import run_comfy_bench

        return run_comfy_bench(cfg, progress)
    preset = PRESETS[cfg.preset]
    ctx = BenchContext(cfg, preset, progress)
    name = torch.cuda.get_device_name() if cfg.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    result = BenchResult(cfg.device, name, cfg.preset, ctx.steps, torch.__version__)
    for suite in SUITES:
        for row in suite(ctx):
            if row is not None:
                result.rows.append(row)
    os.makedirs(cfg.out_dir, exist_ok=True)
    result.json_path = os.path.join(cfg.out_dir, "bench.json")
    result.png_path = write_chart(result, os.path.join(cfg.out_dir, "bench.png"))
    with open(result.json_path, "w") as f:
        json.dump({**{k: v for k, v in asdict(result).items() if k != "rows"}, "config": asdict(cfg),
                   "rows": [asdict(r) for r in result.rows]}, f, indent=2)
    return result
