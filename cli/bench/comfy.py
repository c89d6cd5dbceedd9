"""`sd-accel bench --host comfy`: ComfyUI eager, ComfyUI's own TorchCompileModel and our nodes, in one process.

Everything goes through ComfyUI's own code: a real SD1.5 (or SDXL) checkpoint state dict with
seeded random weights is built in memory, loaded by `comfy.sd.load_state_dict_guess_config`,
patched by the nodes (ours: `SDAccelCompileUNet`, `SDAccelFP16Cast`; the host's:
`TorchCompileModel`) and sampled by `comfy.sample.sample` (euler, normal schedule, CFG, so the
UNet sees cond and uncond as one batch of 2) under `torch.inference_mode`, as ComfyUI's
executor runs it. Every row is timed in the same process as the eager baseline it is compared
with. ms/step is end-to-end sampling time over steps (what a user waits for), so it includes
ComfyUI's own per-step work outside the UNet.

Diagnostics per row (in the row note and bench.json): dynamo graph breaks, graphs, frames compiled (first compile and recompiles)
and CUDA-graph skips counted during that row, and `unet` = GPU time spanned by the UNet call
per step (CUDA events in one extra run), so `ms/step - unet` is the time the sampler spends
outside the UNet. `SD_ACCEL_BENCH_PROFILE=<row-prefix>` also writes a torch.profiler summary
of one sampling run of the matching rows.

Presets (comfy_presets.py; the ComfyUI loader needs real shapes, so "tiny" is real SD1.5 at a small
latent): tiny = SD1.5 at 128x128, 4 steps (a CPU smoke run); sd15-512 = 512x512, 20 steps; sdxl-1024;
the DiT families (flux-1024, qwen-image-1328, zimage-1024, wan-480p, ltx-768x512 and their -tiny sizes; ltx2-tiny, minimax-tiny), whose
models are built in dit.py and whose rows are in dit_rows.py. ComfyUI is imported as its main.py
would (DynamicVRAM where main.py turns it on: comfy_boot.py).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ...accel_core.errors import SDAccelError
from ...accel_core.log import logger
from .comfy_boot import comfy_root, comfy_version, import_comfy
from .comfy_presets import DIT_FAMILIES, PRESETS, ComfyPreset
from .measure import BenchConfig, BenchRow, compare, failed_row, rel_err, time_runs, timed_row

# UNet configs as comfy/model_detection.py writes them (identical in ComfyUI 0.3.64 and 0.8.0).
SD15_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
                 in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 channel_mult=[1, 2, 4, 4], transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768, num_heads=8,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False, use_temporal_resblock=False)
SDXL_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False, num_classes="sequential",
                 adm_in_channels=2816, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10],
                 channel_mult=[1, 2, 4], transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False, use_temporal_resblock=False)


BASELINE = "comfy eager (baseline)"


# --- model and inputs ------------------------------------------------------------------------------

class _ShapeOps:
    """Plain torch layers in UNetModel's `operations` slot, only to list the checkpoint's tensors.

    ComfyUI's own layers defer Linear and Embedding weights to load time under DynamicVRAM
    (comfy-aimdo), so their state_dict() would leave those tensors out.
    """

    Linear = torch.nn.Linear
    Conv2d = torch.nn.Conv2d
    Conv3d = torch.nn.Conv3d
    GroupNorm = torch.nn.GroupNorm
    LayerNorm = torch.nn.LayerNorm

    @staticmethod
    def conv_nd(dims, *args, **kwargs):
        return {2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dims](*args, **kwargs)


def unet_state_dict(arch: str, seed: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A checkpoint-style state dict (`model.diffusion_model.*`) of the real architecture, seeded random weights.

    Fan-in scaled normal weights keep activations O(1) through every block, so fp16 outputs
    stay finite and the relative error between rows measures the rows, not overflow.
    """
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = dict(SD15_UNET if arch == "sd15" else SDXL_UNET)
    shapes = UNetModel(**cfg, dtype=torch.float32, device="meta", operations=_ShapeOps).state_dict()
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for name, t in shapes.items():
        shape = tuple(t.shape)
        if len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            w = torch.randn(shape, generator=g, device=device) * (0.5 / math.sqrt(fan_in))
        elif name.endswith("weight"):  # norm scales
            w = 1.0 + 0.05 * torch.randn(shape, generator=g, device=device)
        else:
            w = 0.02 * torch.randn(shape, generator=g, device=device)
        sd[f"model.diffusion_model.{name}"] = w.to(dtype)
    return sd


def checkpoint_file(arch: str, seed: int, device: str, dtype: torch.dtype) -> str:
    """The generated checkpoint as a safetensors file (written once per arch/seed/device/dtype in the temp folder).

    Loaded from a file, as ComfyUI's loader nodes do: a DynamicVRAM ComfyUI rebuilds a regular
    copy of a model from its file (`clone(disable_dynamic=True)`), which SD Accel's weight-changing
    nodes and the built-in TorchCompileModel need.
    """
    import tempfile

    from safetensors.torch import save_file

    path = os.path.join(tempfile.gettempdir(), f"sd_accel_bench_{arch}_{seed}_{device}_{str(dtype).split('.')[-1]}.safetensors")
    if not os.path.exists(path):
        sd = {k: v.contiguous().cpu() for k, v in unet_state_dict(arch, seed, device, dtype).items()}
        save_file(sd, path + ".part")
        os.replace(path + ".part", path)
    return path


def load_model(arch: str, seed: int, device: str):
    import comfy.sd

    dtype = torch.float16 if device == "cuda" else torch.float32
    out = comfy.sd.load_checkpoint_guess_config(checkpoint_file(arch, seed, device, dtype), output_vae=False, output_clip=False)
    if out is None or out[0] is None:
        raise SDAccelError("SD Accel bench: ComfyUI did not recognise the generated state dict as a UNet; this ComfyUI version's model detection differs from what the benchmark expects.")
    return out[0]


def load_preset_model(preset: ComfyPreset, seed: int, device: str) -> tuple[object, str]:
    """(MODEL, how it was loaded) for a preset: an SD checkpoint, or a DiT family's model (dit.py)."""
    if preset.dit:
        from . import dit

        return dit.load_model(preset.arch, preset.tiny, seed, device)
    return load_model(preset.arch, seed, device), f"{preset.arch} checkpoint (comfy.sd.load_checkpoint_guess_config)"


@dataclass
class ComfyInputs:
    positive: list
    negative: list
    latent: torch.Tensor
    noise: torch.Tensor


def make_inputs(arch: str, side: int, seed: int, batch: int = 1, tiny: bool = False) -> ComfyInputs:
    import comfy.sample

    g = torch.Generator().manual_seed(seed)
    if arch in DIT_FAMILIES:
        from . import dit

        pos = dit.conditioning(arch, tiny, g)
        neg = dit.conditioning(arch, tiny, g)
        latent = dit.latent(arch, tiny)
        return ComfyInputs(pos, neg, latent, comfy.sample.prepare_noise(latent, seed))
    cdim = SD15_UNET["context_dim"] if arch == "sd15" else SDXL_UNET["context_dim"]

    def cond():
        extra = {}
        if arch == "sdxl":
            extra = {"pooled_output": torch.randn(1, 1280, generator=g) * 0.5, "width": side * 8, "height": side * 8}
        return [[torch.randn(1, 77, cdim, generator=g) * 0.5, extra]]

    latent = torch.zeros(batch, 4, side, side)
    return ComfyInputs(cond(), cond(), latent, comfy.sample.prepare_noise(latent, seed))


# --- measuring -----------------------------------------------------------------------------------

def sync_device(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _counters() -> dict:
    from torch._dynamo.utils import counters

    # Dynamo keeps no recompile counter: every frame it compiles (first compile or recompile)
    # is counted in frames/ok, so a delta of 0 over a run means nothing was (re)compiled.
    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "graphs": counters["stats"].get("unique_graphs", 0),
        "frames_compiled": counters["frames"].get("ok", 0),
        "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0),
    }


@contextlib.contextmanager
def _cache_stats():
    """The stats events of the step caches that ran inside the block (DeepCache, Step Cache): a cache
    row's note says what its last run cached, so its ms/step can be read against its share of blocks."""
    from ...accel_core import events

    seen: list = []
    listener = lambda ev, data: seen.append((ev, data)) if ev in ("stepcache_stats", "deepcache_stats") else None  # noqa: E731
    events.subscribe(listener)
    try:
        yield seen
    finally:
        events.unsubscribe(listener)


def _cached(seen: list) -> str:
    ev, d = seen[-1]
    if ev == "deepcache_stats":
        return f"{d['hits']}/{d['hits'] + d['full']} steps"
    return f"{d['cached']}/{d['calls']} calls, {100 * d['block_fraction']:.0f}% of blocks"


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def _unet_span_wrapper(log: list, executor, *args, **kwargs):
    # APPLY_MODEL wrapper (diagnostic run only): GPU time between entering and leaving apply_model
    # (the UNet plus a few input/output scalings). Not DIFFUSION_MODEL: the built-in node compiles
    # UNetModel.forward, which runs those wrappers inside its graph (and would recompile on them).
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = executor(*args, **kwargs)
    end.record()
    log.append((start, end))
    return out


class ComfyBench:
    def __init__(self, cfg: BenchConfig, preset: ComfyPreset, progress=None):
        self.cfg, self.preset, self.progress = cfg, preset, progress
        self.device = cfg.device
        self.steps = cfg.steps or preset.steps
        self.root = comfy_root(cfg.comfyui_path)
        self.mm, self.dynamic_vram = import_comfy(self.root, self.device, cfg.dynamic_vram)
        self.model, self.loaded_as = load_preset_model(preset, cfg.seed, self.device)
        self.inputs = make_inputs(preset.arch, preset.latent, cfg.seed, tiny=preset.tiny)
        self.baseline: BenchRow | None = None
        self.baseline_out: torch.Tensor | None = None
        self.baseline_call: torch.Tensor | None = None  # DiTs: eager's one model call (see measure's `rel`)
        self.diagnostics: dict[str, dict] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.profile = tuple(p for p in os.environ.get("SD_ACCEL_BENCH_PROFILE", "").split(",") if p)

    def wanted(self, name: str) -> bool:
        if self.baseline is None and name == BASELINE:
            return True
        if self.cfg.configs is None:
            return not name.startswith("exp")  # experiments run only when named
        return any(name.startswith(c) for c in self.cfg.configs)

    def sample(self, model, steps: int | None = None, cfg_scale: float | None = None, sampler: str = "euler", scheduler: str | None = None,
               inputs: ComfyInputs | None = None) -> torch.Tensor:
        import comfy.sample

        from . import dit

        i = inputs or self.inputs
        scheduler = scheduler or self.preset.scheduler
        out = comfy.sample.sample(model, i.noise, steps or self.steps, self.cfg.cfg_scale if cfg_scale is None else cfg_scale,
                                  sampler, scheduler, i.positive, i.negative, i.latent, denoise=1.0, disable_pbar=True, seed=self.cfg.seed)
        return dit.flat(out)  # an audio+video latent (MiniMax H3) as one tensor

    def measure(self, name: str, make: Callable[[], object], note: str = "", compile_ctx: Callable | None = None,
                steps: int | None = None, row_ctx: Callable | None = None, run: Callable | None = None,
                compare_to: str | None = None, rel: str = "latent") -> BenchRow | None:
        """Time full ComfyUI sampling runs of the MODEL `make()` returns; the first run is warm-up (compile).

        `compile_ctx()` is entered around the warm-up run only (inductor config for experiments),
        `row_ctx()` around the whole row (process settings for experiments). `run(model)` replaces
        the 20-step euler run (LCM rows: `steps` steps through their own node); speed-up is
        always end to end (time per image) against the eager baseline, and the relative error
        is against `compare_to`'s final latent when given (a row sampling the same thing).
        `rel="call"`: the error of one model call instead (a 1-step euler run returns the model's
        denoised prediction), against eager's; the final latent's goes in the note (over many steps
        a random DiT amplifies rounding: 0.39 between two compiles of Flux). A row that fails is
        reported with its error; the other rows still run.
        """
        if not self.wanted(name):
            return None
        made = []
        self._fresh()
        before = _counters()
        try:
            with torch.inference_mode(), (row_ctx() if row_ctx else contextlib.nullcontext()), _cache_stats() as caches:
                t0 = time.perf_counter()
                model = make()
                made.append(model)
                steps = steps or self.steps
                run = run or self.sample
                with (compile_ctx() if compile_ctx else contextlib.nullcontext()):
                    out = run(model)
                sync_device(self.device)
                first = time.perf_counter() - t0
                timing = time_runs(lambda: run(model), self.cfg.repeats, self.device, warm_up=False)
                timing.first_s, out = first, timing.out
                peak = torch.cuda.max_memory_allocated() / 2 ** 20 if self.device == "cuda" else None
                diag = _delta(before, _counters())
                if caches:  # the timed runs' (the one-call run below would report a 1-step run)
                    diag["cached"] = _cached(caches)
                call = self.sample(model, steps=1) if rel == "call" else None
                if self.device == "cuda":  # DynamicVRAM keeps weights outside torch's allocator: the device's own count too
                    free, total = torch.cuda.mem_get_info()
                    diag["device_used_gb"] = round((total - free) / 2 ** 30, 1)
                try:  # diagnostics never fail a row
                    if self.device == "cuda" and not self.preset.dit:  # DiTs: one more multi-second run per row, left out
                        diag["unet_ms"] = self._unet_span(model, run, steps)
                    if self.profile and name.startswith(self.profile):
                        self._profile(name, model, run)
                except Exception as e:
                    logger.warning("SD Accel bench: diagnostics for %r failed: %s: %s", name, type(e).__name__, e)
        except Exception as e:  # a failing row must not hide the others
            if name == BASELINE:
                raise
            logger.exception("SD Accel bench: row %r failed", name)
            row = failed_row(name, steps or self.steps, e)
            self._done(name)
            return row
        row = timed_row(name, timing, steps, peak_mem_mb=peak, note=note)
        if self.baseline is None:
            self.baseline, self.baseline_out, self.baseline_call = row, out, call
            compare(row, row)  # 1.0, and the baseline's own spread
        else:
            compare(row, self.baseline)
            ref = self.outputs.get(compare_to, self.baseline_out)
            row.rel_err = rel_err(out, ref)
            if compare_to:
                row.note = (row.note + "; " if row.note else "") + f"rel err vs {compare_to!r}"
            if call is not None and self.baseline_call is not None:
                row.rel_err = rel_err(call, self.baseline_call)
                row.note = (row.note + "; " if row.note else "") + f"rel err of one model call (final latent: {rel_err(out, ref):.3f})"
        if self.preset.dit:
            row.note = f"first image {first:.1f} s" + ("; " + row.note if row.note else "")
        self.outputs[name] = out
        if not torch.isfinite(out).all():
            row.note = (row.note + "; " if row.note else "") + "NON-FINITE OUTPUT"
        self.diagnostics[name] = diag
        extra = [f"{k}={v}" for k, v in diag.items() if k not in ("unet_ms", "device_used_gb") and v]
        if "device_used_gb" in diag:
            extra.append(f"device {diag['device_used_gb']} GB in use")
        if "unet_ms" in diag:
            extra.insert(0, f"unet {diag['unet_ms']:.2f} ms")
        if extra:
            row.note = (row.note + "; " if row.note else "") + ", ".join(extra)
        status = _report_status(made[0]) if made else ""
        if status:
            row.note = f"{status}; {row.note}" if row.note else status
        self._done(name)
        return row

    def _fresh(self):
        # Each row starts from the same state: nothing loaded, no compiled code, CUDA-graph pools
        # or dropped models of earlier rows (so peak memory is this row's), peak counter reset.
        # (ComfyUI itself collects dropped models with gc.collect when it notices them.)
        self.mm.unload_all_models()
        torch._dynamo.reset()
        gc.collect()
        self.mm.soft_empty_cache()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def measure_changes(self, name: str, make: Callable[[], object], phases: list[tuple], note: str = "") -> BenchRow | None:
        """What a change costs: sample (first run: compile), time a steady run, then run each phase in
        order and time its first run and the one after, with how many frames dynamo compiled for it
        (0 = reused, 1 = one recompile).

        A phase is (label, latent side, batch): a size change; or (label, change): `change(model)`
        returns the model the graph runs next (a LoRA change: the node run again on its input), and
        its own time counts in the first run, as the user waits for it.
        ms/step and speed-up are the steady run; the phases go in the note and in bench.json's diagnostics.
        """
        if not self.wanted(name):
            return None
        self._fresh()
        arch = self.preset.arch
        try:
            with torch.inference_mode():
                model = make()
                _, first = self._timed(model)
                out, steady = self._timed(model)
                phase_log = []
                for label, *change in phases:
                    c0, t0 = _counters()["frames_compiled"], time.perf_counter()
                    if callable(change[0]):
                        inputs, info = None, {}
                        model = change[0](model)
                    else:
                        inputs, info = make_inputs(arch, change[0], self.cfg.seed, change[1]), {"latent": change[0], "batch": change[1]}
                    self._timed(model, inputs)
                    secs = time.perf_counter() - t0
                    _, again = self._timed(model, inputs)
                    phase_log.append({"phase": label, **info, "first_run_s": secs, "second_run_s": again, "vs_steady": secs / steady,
                                      "frames_compiled": _counters()["frames_compiled"] - c0})
                peak = torch.cuda.max_memory_allocated() / 2 ** 20 if self.device == "cuda" else None
        except Exception as e:
            logger.exception("SD Accel bench: row %r failed", name)
            self._done(name)
            return failed_row(name, self.steps, e)
        row = BenchRow(name, steady / self.steps * 1000, steps=self.steps, peak_mem_mb=peak, compile_s=max(0.0, first - steady), note=note,
                       runs=1)  # one steady run: the phases are the point of this row
        if self.baseline:
            compare(row, self.baseline)
        row.rel_err = rel_err(out, self.baseline_out) if self.baseline_out is not None else 0.0
        parts = [f"{p['phase']}: {p['frames_compiled']} compiled frame(s), first run {p['first_run_s']:.1f} s "
                 f"({p['vs_steady']:.2f}x steady), then {p['second_run_s']:.2f} s" for p in phase_log]
        row.note = "; ".join(([note] if note else []) + parts)
        self.diagnostics[name] = {"phases": phase_log, "first_run_s": first, "steady_run_s": steady}
        self._done(name)
        return row

    def _timed(self, model, inputs: ComfyInputs | None = None) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        out = self.sample(model, inputs=inputs)
        sync_device(self.device)
        return out, time.perf_counter() - t0

    def _done(self, name):
        if self.progress:
            self.progress(name)

    def _unet_span(self, model, run, steps) -> float:
        """GPU ms per step spent inside apply_model (the UNet), from one extra sampling run."""
        import comfy.patcher_extension as pe

        log: list = []
        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "sd_accel.cli.bench.span", functools.partial(_unet_span_wrapper, log))
        run(m)
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in log) / max(1, steps)

    def _profile(self, name: str, model, run):
        safe = "".join(c if c.isalnum() else "_" for c in name)[:40]
        path = os.path.join(self.cfg.out_dir, f"profile_{safe}.txt")
        write_profile(lambda: run(model), path, self.device)
        logger.info("SD Accel bench: profile of %r written to %s", name, path)


def write_profile(run, path: str, device: str):
    """torch.profiler tables (by self CPU time, and by GPU time on CUDA) of one `run()`, written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        run()
        sync_device(device)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))
        if device == "cuda":
            f.write("\n\n")
            f.write(prof.key_averages().table(sort_by="self_cuda_time_total" if _has_cuda_key(prof) else "self_device_time_total", row_limit=25, max_name_column_width=70))


def _has_cuda_key(prof) -> bool:
    try:
        ev = prof.key_averages()[0]
        return hasattr(ev, "self_cuda_time_total") and not hasattr(ev, "self_device_time_total")
    except Exception:
        return False


# --- rows ------------------------------------------------------------------------------------------

def builtin_compile(model, backend: str = "inductor"):
    """ComfyUI's TorchCompileModel node, called as the executor calls it."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    out = TorchCompileModel.execute(model, backend=backend)
    return out.result[0] if hasattr(out, "result") else out[0]


def our_compile(model, mode: str, dynamic: bool | None = False, guards: str = "full", torch_backend: str = "inductor"):
    if dynamic is None or guards != "full" or torch_backend != "inductor":  # not node choices: through the adapter
        from ...accel_core.compiling import CompileConfig
        from ...accel_core.hosts.comfy import apply_compile

        return apply_compile(model, CompileConfig(backend="inductor", mode=mode, dynamic=dynamic, guards=guards, torch_backend=torch_backend))
    from ...nodes.compile import SDAccelCompileUNet

    return SDAccelCompileUNet().apply(model, backend="inductor", mode=mode, dynamic=dynamic, fullgraph=False)[0]


def our_cast(model, channels_last=True, attention="auto"):
    from ...nodes.cast import SDAccelFP16Cast

    return SDAccelFP16Cast().apply(model, dtype="auto", channels_last=channels_last, attention=attention)[0]


def inductor_patch(**opts):
    def ctx():
        import torch._inductor.config as ic

        return ic.patch(**opts)
    return ctx


def _report_status(model) -> str:
    """Our compile report's status ("compiled", "partial", "eager") for models our nodes patched."""
    from ...accel_core.hosts.comfy import compile_report

    try:
        rep = compile_report(model)
    except Exception:
        return ""
    if not rep:
        return ""
    return rep["status"] + (f" (kept eager: {', '.join(rep['fallbacks'])})" if rep.get("fallbacks") else "")


__all__ = ["ComfyBench", "comfy_root", "comfy_version", "import_comfy", "unet_state_dict", "write_profile", "PRESETS", "ComfyPreset"]
