"""`sd-accel bench`: the unaccelerated baseline and each acceleration side by side, in one process.

Default: an SD1.5-layout UNet (the real block structure, narrow widths) with seeded random
weights built in-process, sampled on the CPU at a small latent; it shows the CPU path
(bf16 + channels_last + inductor) against fp32 eager. `--device cuda --preset sd15-512|sdxl-1024`
runs real sizes; `--checkpoint FILE.safetensors` uses the user's UNet through diffusers'
single-file conversion. Every row is measured in the same run as the baseline it is
compared with: ms per step, speed-up, relative error of the final latent, peak memory,
compile (first-run) seconds.

Features add rows by registering a suite: `register_suite(fn)`, where `fn(ctx)` yields
`BenchRow`s measured with `ctx.measure(...)`.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable

import torch

from .errors import SDAccelError
from .log import logger

# SD1.5 / SDXL UNet2DConditionModel configs (diffusers names); "tiny" keeps SD1.5's block
# layout (4 levels, 2 res blocks each, cross-attention in the first 3) with narrow widths.
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32)
TINY = dict(SD15, block_out_channels=(32, 64, 96, 96), cross_attention_dim=64, norm_num_groups=16, sample_size=16)


@dataclass(frozen=True)
class Preset:
    unet: dict
    latent: int  # latent side (pixels / 8)
    steps: int
    context_len: int = 77


HOSTS = ("diffusers", "comfy")
PRESETS = {
    "tiny": Preset(TINY, 16, 8),
    "sd15-512": Preset(SD15, 64, 20),
    "sdxl-1024": Preset(SDXL, 128, 20),
}


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
            from .errors import choice_error

            raise choice_error("host", self.host, HOSTS)
        if self.preset not in PRESETS:
            from .errors import choice_error

            raise choice_error("preset", self.preset, PRESETS)
        if self.device not in ("cpu", "cuda"):
            from .errors import choice_error

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

def build_unet(preset: Preset, seed: int, device: str, dtype: torch.dtype, checkpoint: str | None = None):
    from .optional import require

    diffusers = require("diffusers", "the benchmark")
    if checkpoint:
        return load_checkpoint_unet(checkpoint).to(device=device, dtype=dtype).eval()
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**preset.unet)
    return unet.to(device=device, dtype=dtype).eval()


def load_checkpoint_unet(path: str):
    """A diffusers UNet from an SD1.x / SDXL single-file checkpoint or a UNet-only safetensors file."""
    from .checkpoint import load_unet_state_dict

    sd, arch = load_unet_state_dict(path)
    from diffusers import UNet2DConditionModel

    cfg = dict(SD15 if arch == "sd15" else SDXL)
    unet = UNet2DConditionModel(**cfg)
    missing, unexpected = unet.load_state_dict(sd, strict=False)
    if len(missing) > len(sd) // 10:
        raise SDAccelError(f"SD Accel bench: {path} matched only {len(sd) - len(unexpected)} of {len(unet.state_dict())} UNet weights of the {arch} architecture; expected a full SD1.x or SDXL UNet. Use a checkpoint of one of those.")
    return unet


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


# --- suites ----------------------------------------------------------------------------------

# Rows of the default CPU run (2 cores): the CPU path (bf16 + channels_last + inductor) against
# fp32 eager, and eager DeepCache; one compile in all. Rows that compile or load more (DeepCache +
# compile, LoRA swap vs recompile, LCM) run with --all or --configs.
CPU_DEFAULT_PREFIXES = ("eager", "inductor default")
CPU_DEFAULT_ROWS = ("deepcache i2", "deepcache i3", "deepcache i5")

SUITES: list[Callable[[BenchContext], Iterable[BenchRow]]] = []


def register_suite(fn):
    if fn not in SUITES:
        SUITES.append(fn)
    return fn


@register_suite
def core_suite(ctx: BenchContext):
    from .cast import CastConfig, cast
    from .compile import CompileConfig, compile

    fast = "fp16" if ctx.device == "cuda" else "bf16"
    fast_dtype = torch.float16 if fast == "fp16" else torch.bfloat16
    base = ctx.unet
    yield ctx.measure(f"eager {'fp16' if ctx.device == 'cuda' else 'fp32'} (baseline)", lambda: unet_caller(base))
    cast_unet = cast(base, CastConfig(dtype=fast, channels_last=True))
    yield ctx.measure(f"eager {fast} + channels_last", lambda: unet_caller(cast_unet), dtype=fast_dtype)
    modes = ["default"] + (["reduce-overhead"] if ctx.device == "cuda" else [])
    for mode in modes:
        cu = compile(cast_unet, CompileConfig(backend="inductor", mode=mode))
        row = ctx.measure(f"inductor {mode} + {fast} + channels_last", lambda: unet_caller(cu), dtype=fast_dtype)
        if row is not None:
            row.note = cu.report.status  # known only once it ran
        yield row


def _suites():
    # Feature modules register their suites on import.
    import importlib

    for mod in ("deepcache", "lora", "lcm"):
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ImportError as e:
            if f"{__package__}.{mod}" not in str(e):
                logger.warning("SD Accel bench: %s rows skipped: %s", mod, e)
    return SUITES


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Run every registered suite; write JSON and a PNG chart into cfg.out_dir."""
    if cfg.host == "comfy":
        from .bench_comfy import run_comfy_bench

        return run_comfy_bench(cfg, progress)
    preset = PRESETS[cfg.preset]
    ctx = BenchContext(cfg, preset, progress)
    name = torch.cuda.get_device_name() if cfg.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    result = BenchResult(cfg.device, name, cfg.preset, ctx.steps, torch.__version__)
    for suite in _suites():
        for row in suite(ctx):
            if row is not None:
                result.rows.append(row)
    os.makedirs(cfg.out_dir, exist_ok=True)
    result.json_path = os.path.join(cfg.out_dir, "bench.json")
    with open(result.json_path, "w") as f:
        json.dump({**{k: v for k, v in asdict(result).items() if k != "rows"}, "config": asdict(cfg),
                   "rows": [asdict(r) for r in result.rows]}, f, indent=2)
    result.png_path = write_chart(result, os.path.join(cfg.out_dir, "bench.png"))
    return result


def write_chart(result: BenchResult, path: str) -> str | None:
    from .optional import is_available, warn_missing

    if not is_available("matplotlib"):
        warn_missing("matplotlib", "so the benchmark chart (PNG) is not written")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in result.rows]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.5))
    bars = ax.barh(names[::-1], [r.speedup for r in result.rows][::-1], color="#4c78a8")
    for bar, r in zip(bars, result.rows[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r.speedup:.2f}x  {r.ms_per_step:.1f} ms/step  err {r.rel_err:.3f}", va="center", fontsize=8)
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("speed-up vs baseline (same run)")
    ax.set_title(f"SD Accel bench: {result.preset}, {result.steps} steps, {result.device_name}", fontsize=10)
    ax.set_xlim(0, max(r.speedup for r in result.rows) * 1.6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
