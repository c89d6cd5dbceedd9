"""What `sd-accel bench` measures with: its config, rows and result, the inputs, the sampling loop
and `BenchContext.measure`, which times a row in the same process as the baseline it is compared with.

Each row is one warm-up run (compiles) and then `repeats` timed runs: the row shows their median
and their min-max, so a spread says how far to trust it.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ...accel_core.errors import SDAccelError, choice_error
from ...accel_core.log import plural
from .models import PRESETS, Preset, build_unet

HOSTS = ("diffusers", "comfy")
DYNAMO_BACKENDS = ("inductor", "aot_eager", "eager")  # eager/aot_eager: trace and guard without kernels (smoke runs of the DiT rows)
DEVICES = ("cpu", "cuda")
DEFAULT_REPEATS = 5
# A row whose timed runs differ by more than this fraction of their median, or a 1-minute load
# average above this many runnable tasks per core when the run starts, marks the machine busy.
BUSY_SPREAD = 0.25
BUSY_LOAD_PER_CORE = 0.5

# Rows of the default CPU run (2 cores): the CPU path (bf16 + channels_last + inductor) against
# fp32 eager, and eager DeepCache; one compile in all. Rows that compile or load more (DeepCache +
# compile, LoRA swap vs recompile, LCM) run with --all or --configs.
CPU_DEFAULT_PREFIXES = ("eager", "inductor default")
CPU_DEFAULT_ROWS = ("deepcache i2", "deepcache i3", "deepcache i5")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads() -> int:
    """Half the cores: OpenMP threads wait at every barrier for the slowest one, so a thread per core
    turns any other process on the machine into stalls; with headroom the rows stay comparable."""
    return max(1, available_cores() // 2)


def _at_least_one(value, flag: str, what: str, todo: str):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SDAccelError(f"SD Accel bench: {flag} expects {what} (a whole number of at least 1), found {value!r}. {todo}")


@dataclass
class BenchConfig:
    device: str = "cpu"
    preset: str = "tiny"
    steps: int | None = None  # None: the preset's
    cfg_scale: float | None = None  # None: the preset's (7 for SD; Flux 1, Qwen-Image 4, Z-Image 1, Wan 5)
    checkpoint: str | None = None
    configs: tuple[str, ...] | None = None  # row names to run (prefix match); None = the default rows
    out_dir: str = "bench-out"
    seed: int = 0
    repeats: int = DEFAULT_REPEATS  # timed runs per row, after one warm-up run
    host: str = "diffusers"  # "diffusers" (a diffusers UNet, our own Euler loop) or "comfy" (ComfyUI's loader and sampler)
    comfyui_path: str | None = None  # host "comfy": the ComfyUI folder (default: $COMFYUI_PATH)
    threads: int | None = None  # torch CPU threads for the run (None: default_threads()), restored after
    dynamic_vram: str = "auto"  # host "comfy": DynamicVRAM as ComfyUI's main.py starts it ("auto"), required ("on") or not ("off")
    dynamo_backend: str = "inductor"  # host "comfy", DiT presets: the torch.compile backend of the compile rows
    wavespeed: str | None = None  # host "comfy", DiT presets: a Comfy-WaveSpeed checkout, for its rows beside ours

    def __post_init__(self):
        if self.host not in HOSTS:
            raise choice_error("host", self.host, HOSTS)
        if self.device not in DEVICES:
            raise choice_error("device", self.device, DEVICES)
        preset = self._check_preset()
        if self.cfg_scale is None:
            self.cfg_scale = getattr(preset, "cfg", 7.0)
        if self.steps is not None:
            _at_least_one(self.steps, "--steps", "the number of sampling steps",
                          f"Give 1 or more, or leave it out for the preset's {preset.steps}.")
        _at_least_one(self.repeats, "--repeats", "the number of timed runs per row",
                      f"Give 1 or more ({DEFAULT_REPEATS}, the default, shows a spread; 1 shows none).")
        if self.threads is not None:
            _at_least_one(self.threads, "--threads", "the number of CPU threads",
                          f"Give 1 to {available_cores()} (this machine's cores), or leave it out for {default_threads()}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SDAccelError(f"SD Accel bench: --seed expects a whole number of 0 or more, found {self.seed!r}. Give e.g. --seed 0.")
        if isinstance(self.cfg_scale, bool) or not isinstance(self.cfg_scale, (int, float)) or not 0 <= self.cfg_scale < math.inf:
            raise SDAccelError(f"SD Accel bench: the CFG scale expects a finite number of 0 or more, found {self.cfg_scale!r}. Give e.g. 7.0.")
        if self.configs is not None:
            if isinstance(self.configs, str) or not all(isinstance(c, str) for c in self.configs):
                raise SDAccelError(f"SD Accel bench: --configs expects row-name prefixes (strings), found {self.configs!r}. "
                                   "Give e.g. --configs eager deepcache.")
            self.configs = tuple(self.configs)
        for flag, value in (("--checkpoint", self.checkpoint), ("--comfyui-path", self.comfyui_path), ("--wavespeed", self.wavespeed)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise SDAccelError(f"SD Accel bench: {flag} expects a path, found {value!r}. Give the path, or leave the option out.")
        if not isinstance(self.out_dir, str) or not self.out_dir.strip():
            raise SDAccelError(f"SD Accel bench: --out expects a folder for bench.json and bench.png, found {self.out_dir!r}. Give e.g. --out bench-out.")
        if self.dynamic_vram not in ("auto", "on", "off"):
            raise choice_error("dynamic_vram", self.dynamic_vram, ("auto", "on", "off"))
        if self.dynamo_backend not in DYNAMO_BACKENDS:
            raise choice_error("dynamo_backend", self.dynamo_backend, DYNAMO_BACKENDS)
        if self.dynamo_backend != "inductor" and not getattr(preset, "dit", False):
            raise SDAccelError(f"SD Accel bench: --dynamo-backend {self.dynamo_backend} applies to the DiT presets of --host comfy (e.g. "
                               "flux-tiny); the SD rows compile with inductor. Leave it out, or pick a DiT preset.")
        if self.wavespeed is not None and not getattr(preset, "dit", False):
            raise SDAccelError(f"SD Accel bench: --wavespeed adds WaveSpeed's rows to the DiT presets of --host comfy (e.g. flux-1024); "
                               f"found --preset {self.preset}. Leave it out, or pick a DiT preset.")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SDAccelError("SD Accel bench: --device cuda was asked for, but torch sees no CUDA device. Run with --device cpu, or on a machine with an NVIDIA GPU and a CUDA build of torch.")

    def _check_preset(self):
        from .comfy_presets import PRESETS as COMFY

        table = COMFY if self.host == "comfy" else PRESETS
        if self.preset in table:
            preset = table[self.preset]
        elif self.preset in COMFY:
            raise SDAccelError(f"SD Accel bench: --preset {self.preset} runs through ComfyUI only; found --host {self.host}. Give --host comfy "
                               "with COMFYUI_PATH or --comfyui-path set to a ComfyUI tree.")
        else:
            raise choice_error("preset", self.preset, table)
        if getattr(preset, "dit", False) and not preset.tiny and self.device == "cpu":
            small = next(k for k, v in COMFY.items() if v.arch == preset.arch and v.tiny)
            raise SDAccelError(f"SD Accel bench: --preset {self.preset} is the full-size model ({preset.what}); on the CPU it would write a "
                               f"multi-GB file and take hours per row. Run it with --device cuda, or use --preset {small} on the CPU.")
        return preset


def check_configs(configs: tuple[str, ...] | None, names: list[str]):
    """Every --configs prefix must match a row this run can measure."""
    unmatched = [c for c in configs or () if not any(n.startswith(c) for n in names)]
    if unmatched:
        listed = "\n  ".join(names)
        raise SDAccelError(f"SD Accel bench: --configs {' '.join(repr(c) for c in unmatched)} matches no row. Expected the start of a row "
                           f"name; the rows of this run (device and host as given) are:\n  {listed}\nGive one or more of these (or their first words), or --all.")


@dataclass
class BenchRow:
    name: str
    ms_per_step: float  # median of the timed runs (NaN when failed)
    speedup: float = 1.0  # end to end (time per image) against the baseline's median
    rel_err: float = 0.0
    peak_mem_mb: float | None = None
    compile_s: float = 0.0  # first run - fastest run
    steps: int = 0
    note: str = ""
    ms_min: float | None = None  # fastest and slowest timed run, per step
    ms_max: float | None = None
    runs: int = 0  # timed runs behind the median
    speedup_min: float | None = None  # against the slowest / fastest run of this row
    speedup_max: float | None = None
    failed: bool = False
    error: str = ""
    first_s: float | None = None  # the row's first run (its compile included), seconds

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median of the timed runs; 0 with fewer than 2 runs."""
        if self.failed or self.runs < 2 or not self.ms_per_step:
            return 0.0
        return (self.ms_max - self.ms_min) / self.ms_per_step


@dataclass
class Timing:
    first_s: float
    runs_s: list[float]
    out: torch.Tensor | None = None


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_runs(run: Callable[[], torch.Tensor], repeats: int, device: str, warm_up: bool = True) -> Timing:
    """One warm-up run (compiles, captures graphs; skipped with warm_up=False), then `repeats` timed runs."""
    first, out = 0.0, None
    if warm_up:
        t0 = time.perf_counter()
        out = run()
        _sync(device)
        first = time.perf_counter() - t0
    runs = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = run()
        _sync(device)
        runs.append(time.perf_counter() - t0)
    return Timing(first, runs, out)


def timed_row(name: str, timing: Timing, steps: int, **kw) -> BenchRow:
    med = statistics.median(timing.runs_s)
    return BenchRow(name, med / steps * 1000, steps=steps, compile_s=max(0.0, timing.first_s - min(timing.runs_s)), first_s=timing.first_s or None,
                    ms_min=min(timing.runs_s) / steps * 1000, ms_max=max(timing.runs_s) / steps * 1000, runs=len(timing.runs_s), **kw)


def compare(row: BenchRow, base: BenchRow):
    """Speed-up of `row` over `base`, end to end (time per image), so rows with fewer steps compare fairly."""
    per_image = base.ms_per_step * base.steps
    row.speedup = per_image / (row.ms_per_step * row.steps)
    if row.ms_min and row.ms_max:
        row.speedup_min, row.speedup_max = per_image / (row.ms_max * row.steps), per_image / (row.ms_min * row.steps)


def failed_row(name: str, steps: int, e: BaseException) -> BenchRow:
    msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    return BenchRow(name, float("nan"), speedup=0.0, steps=steps, note=f"FAILED: {msg}", failed=True, error=msg)


def busy_reason(load_start: float | None, cores: int, rows: list[BenchRow]) -> str:
    """Why the numbers look disturbed (the load when the run started, or a row's spread); "" when they do not."""
    reasons = []
    if load_start is not None and load_start > BUSY_LOAD_PER_CORE * cores:
        reasons.append(f"load average {load_start:.1f} on {cores} core(s) when the run started")
    noisy = [r for r in rows if r.runs >= 3 and r.spread > BUSY_SPREAD]
    if noisy:
        worst = max(noisy, key=lambda r: r.spread)
        reasons.append(f"{len(noisy)} row(s) varied by more than {BUSY_SPREAD:.0%} between runs (up to {worst.spread:.0%}, {worst.name!r})")
    return "; ".join(reasons)


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
    repeats: int = 1
    threads: int | None = None
    cores: int | None = None
    load_avg_start: float | None = None
    load_avg_end: float | None = None
    busy: bool = False
    busy_reason: str = ""
    complete: bool = False  # False while running, and when the run stopped early (see error)
    error: str = ""
    warnings: list[dict] = field(default_factory=list)
    batch_note: str = "CFG batch 2"

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.rows if r.failed]

    def table(self) -> str:
        head = (f"{'configuration':<44} {'ms/step':>9} {'min-max':>15} {'speed-up':>9} {'(range)':>13} {'rel err':>8} {'peak MB':>8} "
                f"{'compile s':>9}  note")
        threads = f", {plural(self.threads, 'thread')}" if self.threads else ""
        lines = [f"SD Accel bench: {self.preset}, {self.steps} steps, {self.batch_note}, on {self.device_name} (torch {self.torch}{threads}); "
                 f"median of {self.repeats} timed run(s) per row after a warm-up run", head, "-" * len(head)]
        for r in self.rows:
            if r.failed:
                lines.append(f"{r.name:<44} {'FAILED':>9}  {r.error}")
                continue
            mem = f"{r.peak_mem_mb:8.0f}" if r.peak_mem_mb is not None else f"{'-':>8}"
            spread = f"{r.ms_min:.2f}-{r.ms_max:.2f}" if r.ms_min is not None and r.runs > 1 else "-"
            srange = f"{r.speedup_min:.2f}-{r.speedup_max:.2f}" if r.speedup_min is not None and r.runs > 1 else "-"
            lines.append(f"{r.name:<44} {r.ms_per_step:9.2f} {spread:>15} {r.speedup:8.2f}x {srange:>13} {r.rel_err:8.4f} {mem} "
                         f"{r.compile_s:9.1f}  {r.note}")
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

    def done(self, row: BenchRow) -> BenchRow:
        self.rows[row.name] = row
        if self.progress:
            self.progress(row.name)
        return row

    def measure(self, name: str, make: Callable[[], Callable], dtype: torch.dtype | None = None, steps: int | None = None,
                note: str = "", run: Callable | None = None) -> BenchRow | None:
        """Time full sampling runs of the callable `make()` returns (see `time_runs`).

        `run(call)` overrides the sampling loop (suites with their own schedules); it returns the final latent.
        A row that raises comes back marked failed; the baseline's failure ends the run (nothing to compare with).
        """
        if not self.wanted(name):
            return None
        dtype = dtype or self.base_dtype
        steps = steps or self.steps
        run = run or (lambda call: sample(call, self.inputs, self.cfg.cfg_scale, dtype))
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            with torch.inference_mode():
                call = make()
                timing = time_runs(lambda: run(call), self.cfg.repeats, self.device)
        except Exception as e:
            if self.baseline is None:
                raise
            return self.done(failed_row(name, steps, e))
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if self.device == "cuda" else None
        row = timed_row(name, timing, steps, peak_mem_mb=peak, note=note)
        if self.baseline is None:
            self.baseline, self.baseline_out = row, timing.out
            compare(row, row)  # 1.0, and the baseline's own spread
        else:
            compare(row, self.baseline)
            row.rel_err = rel_err(timing.out, self.baseline_out)
        return self.done(row)
