"""The benchmark's rows: the core (cast + compile), DeepCache, LoRA hot-swap and LCM suites.

Each suite is `fn(ctx)` yielding `BenchRow`s measured with `ctx.measure(...)`, in the order of
SUITES; the first row measured is the baseline the others are compared with.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time

import torch
from safetensors.torch import save_file

from ...accel_core.casting import CastConfig, cast
from ...accel_core.compiling import CompileConfig, compile
from ...accel_core.deepcaching import DeepCacheConfig, deepcache, full_steps
from ...accel_core.lcm import LcmConfig, lcm_sample
from ...accel_core.lora import LoraSpec, apply_loras
from .measure import BenchContext, Inputs, Timing, compare, make_inputs, rel_err, sample, time_runs, timed_row, unet_caller
from .synthetic import make_random_lora

INTERVALS = (2, 3, 5)
LORA_ROWS = ("lora hot-swap on compiled UNet (+1 run)", "lora reload + recompile (+1 run)")
LCM_BASE_STEPS, LCM_STEPS = 25, 4


# --- row names (also what --configs is checked against) ---------------------------------------

def _fast(device: str) -> str:
    return "fp16" if device == "cuda" else "bf16"


def _modes(device: str) -> list[str]:
    return ["default"] + (["reduce-overhead"] if device == "cuda" else [])


def baseline_name(device: str) -> str:
    return f"eager {'fp16' if device == 'cuda' else 'fp32'} (baseline)"


def _inductor(mode: str, device: str) -> str:
    return f"inductor {mode} + {_fast(device)} + channels_last"


def _deepcache_compiled(mode: str, device: str) -> str:
    return f"deepcache i3 + inductor {mode} + {_fast(device)} + channels_last"


def _lcm_rows(cfg_scale: float) -> tuple[str, str]:
    return f"euler {LCM_BASE_STEPS} steps cfg {cfg_scale:g} (LCM baseline)", f"lcm-lora {LCM_STEPS} steps cfg 1.5"


def row_names(device: str, cfg_scale: float = 7.0) -> list[str]:
    """Every row the suites below can measure on `device`, in order."""
    return [baseline_name(device), f"eager {_fast(device)} + channels_last", *(_inductor(m, device) for m in _modes(device)),
            *(f"deepcache i{i}" for i in INTERVALS), *(_deepcache_compiled(m, device) for m in _modes(device)),
            *LORA_ROWS, *_lcm_rows(cfg_scale)]


# --- suites -------------------------------------------------------------------------------------

def core_suite(ctx: BenchContext):
    fast = _fast(ctx.device)
    fast_dtype = torch.float16 if fast == "fp16" else torch.bfloat16
    base = ctx.unet
    yield ctx.measure(baseline_name(ctx.device), lambda: unet_caller(base))
    cast_unet = cast(base, CastConfig(dtype=fast, channels_last=True))
    yield ctx.measure(f"eager {fast} + channels_last", lambda: unet_caller(cast_unet), dtype=fast_dtype)
    for mode in _modes(ctx.device):
        cu = compile(cast_unet, CompileConfig(backend="inductor", mode=mode))
        row = ctx.measure(_inductor(mode, ctx.device), lambda: unet_caller(cu), dtype=fast_dtype)
        if row is not None and not row.failed:
            row.note = cu.report.status  # known only once it ran
        yield row


def deepcache_suite(ctx: BenchContext):
    inp = ctx.inputs

    def runner(dc, dtype):
        def run(call):
            with dc.run(inp.timesteps):
                return sample(call, inp, ctx.cfg.cfg_scale, dtype)
        return run

    def caller(dc):
        def call(x, t, c, added):
            kw = {"added_cond_kwargs": added} if added is not None else {}
            return dc(x, t, encoder_hidden_states=c, return_dict=False, **kw)[0]
        return call

    def vs_row(row, ref_names):
        if row is None or row.failed:
            return row
        ref = next((ctx.rows[n] for n in ref_names if n in getattr(ctx, "rows", {})), None)
        if ref is not None:
            row.note = (row.note + "; " if row.note else "") + f"{ref.ms_per_step * ref.steps / (row.ms_per_step * row.steps):.2f}x vs {ref.name}"
        return row

    if ctx.baseline is None:  # run alone (--configs deepcache): measure the baseline first
        yield ctx.measure(baseline_name(ctx.device), lambda: unet_caller(ctx.unet))
    for interval in INTERVALS:
        dc = deepcache(ctx.unet, DeepCacheConfig(cache_interval=interval))
        yield ctx.measure(f"deepcache i{interval}", lambda dc=dc: caller(dc), run=runner(dc, ctx.base_dtype),
                          note=f"depth 0, {sum(not f for f in full_steps(ctx.steps, dc.config))}/{ctx.steps} steps shallow")
    fast = _fast(ctx.device)
    fast_dtype = torch.float16 if fast == "fp16" else torch.bfloat16
    cast_unet = None
    for mode in _modes(ctx.device):
        name = _deepcache_compiled(mode, ctx.device)
        if not ctx.wanted(name):
            continue
        cast_unet = cast_unet or cast(ctx.unet, CastConfig(dtype=fast, channels_last=True))
        dc = deepcache(cast_unet, DeepCacheConfig(cache_interval=3), compile=CompileConfig(backend="inductor", mode=mode))
        row = ctx.measure(name, lambda dc=dc: caller(dc), dtype=fast_dtype, run=runner(dc, fast_dtype))
        if row is not None and not row.failed:
            row.note = f"{dc.full_path.report.status}/{dc.shallow_path.report.status}"
        yield vs_row(row, [_inductor(mode, ctx.device)])


def lora_suite(ctx: BenchContext):
    """LoRA swap latency on a compiled UNet vs what a swap costs without in-place fusing: fresh
    weights, fuse, compile from scratch. Both rows include one sampling run after the change, and
    each is one measurement (a swap happens once): no spread."""
    if not any(ctx.wanted(n) for n in LORA_ROWS):
        return
    unet, steps, dtype, dev = ctx.unet, ctx.steps, ctx.base_dtype, ctx.device
    tmp = tempfile.mkdtemp(prefix="sd-accel-lora-")
    specs = []
    for i in range(2):
        path = os.path.join(tmp, f"lora_{i}.safetensors")
        save_file(make_random_lora(unet, "kohya-diffusers", rank=32, seed=ctx.cfg.seed + i, scope="all", magnitude=0.1), path)
        specs.append(LoraSpec(path, 1.0))
    a, b = specs

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def run(module):
        out = sample(unet_caller(module), ctx.inputs, ctx.cfg.cfg_scale, dtype)
        sync()
        return out

    config = CompileConfig(backend="inductor")
    counters = torch._dynamo.utils.counters
    try:
        with torch.inference_mode():
            apply_loras(unet, [b])
            ref = run(unet)  # eager with LoRA B: what both rows should produce
            cu = compile(unet, config)
            apply_loras(unet, [a])
            run(cu)  # compiles once, with A
            graphs = counters["stats"]["unique_graphs"]
            t0 = time.perf_counter()
            rep = apply_loras(unet, [b])
            sync()
            t_swap = time.perf_counter() - t0
            t0 = time.perf_counter()
            out_swap = run(cu)
            t_run = time.perf_counter() - t0
            recompiles = counters["stats"]["unique_graphs"] - graphs
    finally:
        apply_loras(unet, [])
    t0 = time.perf_counter()
    with torch.inference_mode():
        fresh = copy.deepcopy(unet)  # stands for re-reading the checkpoint's weights
        apply_loras(fresh, [b])
        torch._dynamo.reset()  # backends that bake weights (or a new process) compile from scratch
        out_re = run(compile(fresh, config))
    t_re = time.perf_counter() - t0
    del fresh
    t_hot = t_swap + t_run
    hot = timed_row(LORA_ROWS[0], Timing(t_hot, [t_hot]), steps, rel_err=rel_err(out_swap, ref),
                    note=f"swap {t_swap * 1000:.1f} ms for {rep.layers_changed} weights, {recompiles} recompiles; "
                         f"{t_re / t_hot:.1f}x faster than reload + recompile")
    reload = timed_row(LORA_ROWS[1], Timing(t_re, [t_re]), steps, rel_err=rel_err(out_re, ref),
                   note="fresh weights, fuse, compile from scratch, one run")
    reload.compile_s = max(0.0, t_re - t_run)
    for row in (hot, reload):
        if ctx.baseline:
            compare(row, ctx.baseline)
        yield ctx.done(row)


def lcm_suite(ctx: BenchContext):
    """LCM-LoRA at 4 steps vs the usual 25-step Euler run, end to end, same UNet, same process."""
    names = _lcm_rows(ctx.cfg.cfg_scale)
    if not any(ctx.wanted(n) for n in names):
        return
    unet = ctx.unet
    dtype = ctx.base_dtype
    base_steps, lcm_steps = LCM_BASE_STEPS, LCM_STEPS
    inp: Inputs = make_inputs(unet, ctx.preset, base_steps, ctx.cfg.seed, ctx.device, dtype)
    call = unet_caller(unet)
    tmp = tempfile.mkdtemp(prefix="sd-accel-lcm-")
    path = os.path.join(tmp, "lcm_lora_random.safetensors")
    save_file(make_random_lora(unet, "kohya-diffusers", rank=64, seed=ctx.cfg.seed, scope="all", magnitude=0.05), path)
    spec = LoraSpec(path, 1.0)
    noise = inp.latent / inp.sigmas[0]

    def lcm_run():
        apply_loras(unet, [spec])  # in place, per run, as in ComfyUI; restored exactly after
        try:
            return lcm_sample(lambda x, t, c: call(x, t, c, inp.added), noise, LcmConfig(steps=lcm_steps, cfg=1.5),
                              cond=inp.context[:1], uncond=inp.context[1:], seed=ctx.cfg.seed, dtype=dtype)
        finally:
            apply_loras(unet, [])

    with torch.inference_mode():
        t_base = time_runs(lambda: sample(call, inp, ctx.cfg.cfg_scale, dtype), ctx.cfg.repeats, ctx.device)
        t_lcm = time_runs(lcm_run, ctx.cfg.repeats, ctx.device)
    base = timed_row(names[0], t_base, base_steps, note="the run LCM replaces")
    if ctx.baseline:
        compare(base, ctx.baseline)
    yield ctx.done(base)
    lcm = timed_row(names[1], t_lcm, lcm_steps, rel_err=rel_err(t_lcm.out, t_base.out),
                    note=f"speed-up vs the {base_steps}-step row, LoRA applied+restored per run; random weights: rel err is not a quality measure")
    compare(lcm, base)
    yield ctx.done(lcm)


SUITES = (core_suite, deepcache_suite, lora_suite, lcm_suite)
