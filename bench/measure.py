"""What `sd-accel bench` measures with: its config, rows and result, the inputs, the sampling loop
and `BenchContext.measure`, which times a row in the same process as the baseline it is compared with.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable

import torch

from ..accel_core.errors import SDAccelError, choice_error
from .models import PRESETS, Preset, build_unet

HOSTS = ("diffusers", "comfy")

# Rows of the default CPU run (2 cores): the CPU path (bf16 + channels_last + inductor) against
# fp32 eager, and eager DeepCache; one compile in all. Rows that compile or load more (DeepCache +
# compile, LoRA swap vs recompile, LCM) run with --all or --configs.
CPU_DEFAULT_PREFIXES = ("eager", "inductor default")
CPU_DEFAULT_ROWS = ("deepcache i2", "deepcache i3", "deepcache i5")


@dataclass
class BenchConfig:
    device: str = "cpu"
    preset: str = "tiny"
    steps: int | None = None
    cfg_scale: float = 7.0
    checkpoint: str | None = None
    configs: tuple[str, ...] | None = None  # row names to run (prefix match); None = all available
    out_dir: str = "bench-out"
    seed: int = 0
    repeats: int = 1
    host: str = "diffusers"  # "diffusers" (a diffusers UNet, our own Euler loop) or "comfy" (ComfyUI's loader and sampler)
    comfyui_path: str | None = None  # host "comfy": the ComfyUI folder (default: $COMFYUI_PATH)

    def __post_init__(self):
        if self.host not in HOSTS:
            raise choice_error("host", self.host, HOSTS)
        if self.preset not in PRESETS:
            raise choice_error("preset", self.preset, PRESETS)
        if self.device not in ("cpu", "cuda"):
            raise choice_error("device", self.device, ("cpu", "cuda"))
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SDAccelError("SD Accel bench: --device cuda was asked for, but torch sees no CUDA device. Run with --device cpu, or on a machine with an NVIDIA GPU and a CUDA build of torch.")


@dataclass
class BenchRow:
    name: str
    ms_per_step: float
    speedup: float = 1.0
    rel_err: float = 0.0
    peak_mem_mb: float | None = None
    compile_s: float = 0.0
    steps: int = 0
    note: str = ""


@dataclass
class BenchResult:
    device: str
    device_name: str
    preset: str
    steps: int
    torch: str
    rows: list[BenchRow] = field(default_factory=list)
    json_path: str | None = None
    png_path: str | None = None

    def table(self) -> str:
        head = f"{'configuration':<40} {'ms/step':>9} {'speed-up':>9} {'rel err':>9} {'peak MB':>9} {'compile s':>10}  note"
        lines = [f"SD Accel bench: {self.preset}, {self.steps} steps, CFG batch 2, on {self.device_name} (torch {self.torch})", head, "-" * len(head)]
        for r in self.rows:
            mem = f"{r.peak_mem_mb:9.0f}" if r.peak_mem_mb is not None else f"{'-':>9}"
            lines.append(f"{r.name:<40} {r.ms_per_step:9.2f} {r.speedup:8.2f}x {r.rel_err:9.4f} {mem} {r.compile_s:10.1f}  {r.note}")
        return "\n".join(lines)


# --- model and sampling ------------------------------------------------------------------------

@dataclass
class Inputs:
    latent: torch.Tensor
    context: torch.Tensor  # cond and uncond stacked: batch 2
    added: dict | None
    sigmas: torch.Tensor
    timesteps: torch.Tensor


def make_inputs(unet, preset: Preset, steps: int, seed: int, device: str, dtype: torch.dtype) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    side = preset.latent
    latent = torch.randn(1, 4, side, side, generator=g)
    cdim = unet.config.cross_attention_dim
    context = torch.randn(2, preset.context_len, cdim, generator=g) * 0.5
    added = None
    if unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(2, 1280, generator=g) * 0.5,
                 "time_ids": torch.tensor([[side * 8, side * 8, 0, 0, side * 8, side * 8]] * 2, dtype=torch.float32)}
        added = {k: v.to(device, dtype) for k, v in added.items()}
    # SD's discrete schedule (scaled-linear betas), Euler sampling over `steps` evenly spaced timesteps.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    all_sigmas = ((1 - alphas) / alphas) ** 0.5
    timesteps = torch.linspace(999, 0, steps).round().long()
    sigmas = torch.cat([all_sigmas[timesteps], torch.zeros(1, dtype=torch.float64)]).float()
    return Inputs(latent.to(device) * sigmas[0], context.to(device, dtype), added, sigmas, timesteps)


def sample(unet_call: Callable, inp: Inputs, cfg_scale: float, dtype: torch.dtype, steps: int | None = None, on_step=None) -> torch.Tensor:
    """Euler sampling with CFG (cond and uncond in one batch of 2), the final latent in fp32."""
    x = inp.latent.clone()
    ctx = inp.context.to(dtype)
    added = {k: v.to(dtype) for k, v in inp.added.items()} if inp.added else None
    n = len(inp.timesteps) if steps is None else steps
    for i in range(n):
        sigma, t = inp.sigmas[i], inp.timesteps[i]
        xin = (x / (sigma ** 2 + 1) ** 0.5).to(dtype).expand(2, -1, -1, -1)
        eps = unet_call(xin, t.to(x.device).expand(2), ctx, added).float()
        e_c, e_u = eps.chunk(2)
        eps = e_u + cfg_scale * (e_c - e_u)
        x = x + eps * (inp.sigmas[i + 1] - sigma)
        if on_step is not None:
            on_step(i)
    return x


def unet_caller(module) -> Callable:
    def call(x, t, ctx, added):
        kw = {"added_cond_kwargs": added} if added is not None else {}
        out = module(x, t, encoder_hidden_states=ctx, **kw)
        return out.sample if hasattr(out, "sample") else out[0]
    return call


# --- measuring -------------------------------------------------------------------------------

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


class BenchContext:
    """What a suite needs: the config, the baseline UNet and inputs, and `measure`."""

    def __init__(self, cfg: BenchConfig, preset: Preset, progress=None):
        self.cfg, self.preset = cfg, preset
        self.device = cfg.device
        self.base_dtype = torch.float16 if cfg.device == "cuda" else torch.float32
        self.steps = cfg.steps or preset.steps
        self.unet = build_unet(preset, cfg.seed, cfg.device, self.base_dtype, cfg.checkpoint)
        self.inputs = make_inputs(self.unet, preset, self.steps, cfg.seed, cfg.device, self.base_dtype)
        self.baseline: BenchRow | None = None
        self.baseline_out: torch.Tensor | None = None
        self.rows: dict[str, BenchRow] = {}  # measured so far, for suites that compare with other rows
        self.progress = progress

    def wanted(self, name: str) -> bool:
        configs = self.cfg.configs
        if configs is None and self.device == "cpu":  # the short default; --all runs every row
            return name.startswith(CPU_DEFAULT_PREFIXES) or name in CPU_DEFAULT_ROWS or self.baseline is None
        return configs is None or any(name.startswith(c) for c in configs) or self.baseline is None

    def measure(self, name: str, make: Callable[[], Callable], dtype: torch.dtype | None = None, steps: int | None = None,
                note: str = "", run: Callable | None = None) -> BenchRow | None:
        """Time full sampling runs of the callable `make()` returns; the first run is warm-up (compile).

        `run(call)` overrides the sampling loop (suites with their own schedules); it returns the final latent.
        """
        if not self.wanted(name):
            return None
        dtype = dtype or self.base_dtype
        steps = steps or self.steps
        run = run or (lambda call: sample(call, self.inputs, self.cfg.cfg_scale, dtype))
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            t0 = time.perf_counter()
            call = make()
            out = run(call)  # warm-up: compiles, captures graphs
            _sync(self.device)
            first = time.perf_counter() - t0
            best = math.inf
            for _ in range(max(1, self.cfg.repeats)):
                t0 = time.perf_counter()
                out = run(call)
                _sync(self.device)
                best = min(best, time.perf_counter() - t0)
        ms = best / steps * 1000
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if self.device == "cuda" else None
        row = BenchRow(name, ms, steps=steps, peak_mem_mb=peak, compile_s=max(0.0, first - best), note=note)
        if self.baseline is None:
            self.baseline, self.baseline_out = row, out
        else:
            # Speed-up is end to end (time per image), so rows with fewer steps compare fairly.
            row.speedup = (self.baseline.ms_per_step * self.baseline.steps) / (ms * steps)
            row.rel_err = rel_err(out, self.baseline_out)
        self.rows[name] = row
        if self.progress:
            self.progress(name)
        return row
