"""Speed levers for Compile UNet on ComfyUI with DynamicVRAM, side by side in one process.

    python3 tests/gpu/speed_levers.py --comfyui /path/to/ComfyUI-0.33 --out OUT --arch sd15|sdxl [--rows a,b] [--smoke]

Boots ComfyUI as its main.py does on NVIDIA (tests/gpu/comfy_dynamic_vram.py), loads a checkpoint
of the real architecture with seeded random fp16 weights from a file (cli/bench/comfy.py's writer) and
samples 20 euler steps at CFG 7 (SD1.5 512x512 or SDXL 1024x1024) through ComfyUI's own sampler.

1. Kernel micro-benchmarks at the model's own shapes, recorded from one eager step: every
   attention call under each SDPA backend (flash, cuDNN, efficient), the self-attention q/k/v
   projections as three GEMMs or one fused GEMM, and every linear layer in fp16 or fp8.
2. Rows, each the first run (compile) and the best of `--repeats`: eager, our nodes with each
   lever, ComfyUI's built-in TorchCompileModel and (when `--wavespeed` names its folder)
   Comfy-WaveSpeed's Compile Model+; rel err against eager's final latent.
3. For `--profile ROW`: torch.profiler (GPU kernel time per step, host ranges calc_cond_batch and
   apply_model) and cProfile of one sampling run.

Writes OUT/levers_<arch>.json after every row (a run cut short keeps what it measured), and
profile text files. `--smoke` runs everything on the CPU with dynamo disabled, to check the
plumbing before spending device time.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import importlib
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import comfy_dynamic_vram as dv  # noqa: E402  (boot as main.py does, PyAV stand-in)

SEED = 42
SIDE = {"sd15": 64, "sdxl": 128}


def _pack():
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve() == REPO / "__init__.py":
            return mod.__name__
    raise RuntimeError("ComfyUI did not load SD Accel")


def _sync(cuda):
    if cuda:
        torch.cuda.synchronize()


DEV, DTYPE = "cuda", torch.float16


def _time_cuda(fn, iters=20, warm=3):
    """Median ms of `fn()` by CUDA events (host clock on the CPU smoke run)."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(iters if DEV == "cuda" else 2):
        if DEV != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
            continue
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


class Levers:
    def __init__(self, args):
        self.args = args
        self.cuda = torch.cuda.is_available() and not args.smoke
        if not self.cuda:  # read when comfy.model_management is first imported
            sys.path.insert(0, args.comfyui)
            from comfy.cli_args import args as comfy_args

            comfy_args.cpu = True
        self.nodes = dv.boot(args.comfyui, dynamic=not args.no_dynamic)
        self.pack = _pack()
        self.bc = importlib.import_module(self.pack + ".cli.bench.comfy")
        import comfy.sd
        import comfyui_version

        dev = "cuda" if self.cuda else "cpu"
        t0 = time.perf_counter()
        path = self.bc.checkpoint_file(args.arch, SEED, dev, torch.float16)
        self.base = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]
        side = 16 if args.smoke else SIDE[args.arch]
        self.inputs = self.bc.make_inputs(args.arch, side, SEED)
        self.steps = args.steps
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ref = None
        self.record = {"meta": {
            "device": torch.cuda.get_device_name() if self.cuda else "cpu", "torch": torch.__version__,
            "triton": _version("triton"), "comfyui": comfyui_version.__version__,
            "dynamic_vram": bool(getattr(self.base, "is_dynamic", lambda: False)()), "arch": args.arch,
            "work": f"{args.arch} {side * 8}x{side * 8}, {self.steps} steps euler normal, cfg 7, batch 1 (cond+uncond as 2)",
            "date": time.strftime("%Y-%m-%d"), "checkpoint_s": round(time.perf_counter() - t0, 1)}, "micro": {}, "rows": {}}
        print(json.dumps(self.record["meta"]), flush=True)

    def mod(self, dotted):
        return importlib.import_module(f"{self.pack}.{dotted}")

    def save(self):
        (self.out / f"levers_{self.args.arch}.json").write_text(json.dumps(self.record, indent=1))

    # --- sampling ---------------------------------------------------------------------------------
    def sample(self, model, steps=None):
        import comfy.sample

        i = self.inputs
        _sync(self.cuda)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = comfy.sample.sample(model, i.noise, steps or self.steps, 7.0, "euler", "normal", i.positive, i.negative, i.latent,
                                      denoise=1.0, disable_pbar=True, seed=SEED)
        _sync(self.cuda)
        return out.float().cpu(), time.perf_counter() - t0

    def row(self, name, make, profile=False):
        if self.args.rows and name not in self.args.rows:
            return
        import comfy.model_management as mm
        from torch._dynamo.utils import counters

        mm.unload_all_models()
        torch._dynamo.reset()  # each row's guards and graphs are its own (the on-disk inductor cache stays)
        mm.soft_empty_cache()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        frames0, breaks0 = counters["frames"].get("ok", 0), sum(counters["graph_break"].values())
        t0 = time.perf_counter()
        rec = {}
        try:
            with torch.inference_mode():
                model = make()
            rec["node_s"] = round(time.perf_counter() - t0, 2)
            _, first = self.sample(model)
            outs, times = [], []
            for _ in range(self.args.repeats):
                out, dt = self.sample(model)
                times.append(dt)
            best = min(times)
            rec.update(first_s=round(first, 2), ms_per_step=round(1000 * best / self.steps, 2),
                       ms_per_step_median=round(1000 * statistics.median(times) / self.steps, 2), per_image_s=round(best, 4),
                       frames_compiled=counters["frames"].get("ok", 0) - frames0,
                       graph_breaks=sum(counters["graph_break"].values()) - breaks0)
            if self.cuda:
                free, total = torch.cuda.mem_get_info()
                rec.update(peak_alloc_mb=round(torch.cuda.max_memory_allocated() / 2 ** 20), device_used_mb=round((total - free) / 2 ** 20))
                rec["unet_gpu_ms_per_step"] = round(self._unet_span(model), 2)
            if self.ref is None:
                self.ref = out
            rec["rel_err"] = round(((out - self.ref).norm() / self.ref.norm()).item(), 5)
            rec["finite"] = bool(torch.isfinite(out).all())
            if profile:
                rec["profile"] = self.profile(name, model)
        except Exception as e:  # recorded: the other rows still run
            import traceback

            rec["error"] = "".join(traceback.format_exception(e))[-2500:]
        self.record["rows"][name] = rec
        self.save()
        short = {k: rec.get(k) for k in ("ms_per_step", "unet_gpu_ms_per_step", "rel_err", "first_s", "frames_compiled", "graph_breaks", "peak_alloc_mb")}
        print(f"ROW {name}: {short}" + (f"\n  ERROR {rec['error'][-600:]}" if "error" in rec else ""), flush=True)

    def _unet_span(self, model):
        """GPU ms per step between entering and leaving apply_model (CUDA events, one extra run)."""
        import comfy.patcher_extension as pe

        log = []

        def span(executor, *a, **kw):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out = executor(*a, **kw)
            e.record()
            log.append((s, e))
            return out

        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "levers.span", span)
        self.sample(m)
        return sum(s.elapsed_time(e) for s, e in log) / self.steps

    def profile(self, name, model):
        """Where one sampling run's time goes: GPU kernels, host ranges, Python functions."""
        import comfy.patcher_extension as pe
        from torch.profiler import ProfilerActivity, profile, record_function

        def ranged(label):
            def wrapper(executor, *a, **kw):
                with record_function(label):
                    return executor(*a, **kw)
            return wrapper

        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "levers.prof", ranged("host:calc_cond_batch"))
        m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "levers.prof", ranged("host:apply_model"))
        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "levers.prof", ranged("host:diffusion_model"))
        self.sample(m)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            self.sample(m)
        wall = time.perf_counter() - t0
        ka = prof.key_averages()
        safe = "".join(c if c.isalnum() else "_" for c in name)[:40]
        text = ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
        if self.cuda:
            text += "\n\n" + ka.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60)
        res = {"wall_ms_per_step_profiled": round(1000 * wall / self.steps, 2)}
        for ev in ka:
            if ev.key.startswith("host:"):  # the range appears twice (CPU side, GPU side): keep the CPU one
                key = ev.key + "_cpu_ms_per_step"
                res[key] = max(res.get(key, 0.0), round(ev.cpu_time_total / 1000 / self.steps, 3))
            if ev.key.startswith("## Call CompiledFxGraph"):  # the compiled graph's own GPU time
                res["compiled_graph_gpu_ms_per_step"] = round(ev.device_time_total / 1000 / self.steps, 3)
            if ev.key == "TorchDynamo Cache Lookup":  # guard evaluation, per UNet call
                res["guard_check_cpu_ms_per_call"] = round(ev.cpu_time_total / 1000 / max(1, ev.count), 3)
        # cProfile: Python-level host work of one plain run (inflated by the profiler, ranks are what matter).
        pr = cProfile.Profile()
        pr.enable()
        self.sample(model)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(35)
        text += "\n\ncProfile (tottime), one sampling run\n" + s.getvalue()
        (self.out / f"profile_{self.args.arch}_{safe}.txt").write_text(text)
        print(f"PROFILE {name}: {res}", flush=True)
        return res

    # --- micro-benchmarks at the model's own shapes ------------------------------------------------
    def micro(self):
        if self.args.rows and "micro" not in self.args.rows:
            return
        attn, linears = self._shapes()
        self.record["micro"]["attention_calls_per_step"] = len(attn)
        self.record["micro"]["linear_calls_per_step"] = len(linears)
        try:
            self.record["micro"]["attention"] = self._micro_attention(attn)
            self.record["micro"]["qkv"] = self._micro_qkv(attn)
            self.record["micro"]["linear_fp8"] = self._micro_fp8(linears)
        except Exception as e:
            import traceback

            self.record["micro"]["error"] = "".join(traceback.format_exception(e))[-2000:]
        self.save()
        print("MICRO " + json.dumps({k: v.get("total") if isinstance(v, dict) else v for k, v in self.record["micro"].items()}), flush=True)

    def _shapes(self):
        """The attention calls (q, k shapes, heads) and linear layers (M, K, N) of one eager UNet step."""
        import comfy.patcher_extension as pe

        attn, linears, hooks = [], [], []

        def rec_attn(func, q, k, v, heads, *a, **kw):
            attn.append((tuple(q.shape), tuple(k.shape), heads, bool(kw.get("skip_reshape", False))))
            return func(q, k, v, heads, *a, **kw)

        def rec_linear(mod, inp):
            x = inp[0]
            linears.append((x.numel() // x.shape[-1], mod.in_features, mod.out_features))

        unet = self.base.get_model_object("diffusion_model")
        for mod in unet.modules():
            if isinstance(mod, torch.nn.Linear):
                hooks.append(mod.register_forward_pre_hook(rec_linear))
        m = self.base.clone()
        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = rec_attn
        count = {"n": 0}

        def once(executor, *a, **kw):  # record the first UNet call only
            count["n"] += 1
            return executor(*a, **kw)

        m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "levers.count", once)
        try:
            self.sample(m, steps=1)
        finally:
            for h in hooks:
                h.remove()
        per = max(1, count["n"])
        return attn[: len(attn) // per], linears[: len(linears) // per]

    def _micro_attention(self, calls):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F

        backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
        uniq = {}
        for qs, ks, heads, skip in calls:
            uniq[(qs, ks, heads)] = uniq.get((qs, ks, heads), 0) + 1
        rows, total = [], {b: 0.0 for b in backends}
        total["best_per_shape"] = 0.0
        for (qs, ks, heads), n in uniq.items():
            b, sq, inner = qs
            d = inner // heads
            q = torch.randn(b, heads, sq, d, device=DEV, dtype=DTYPE)
            k = torch.randn(b, heads, ks[1], d, device=DEV, dtype=DTYPE)
            v = torch.randn_like(k)
            r = {"q": [b, heads, sq, d], "kv_len": ks[1], "calls": n}
            for name, be in backends.items():
                try:
                    with sdpa_kernel([be]):
                        r[name] = round(_time_cuda(lambda: F.scaled_dot_product_attention(q, k, v)), 4)
                except Exception as e:
                    r[name] = f"{type(e).__name__}: {str(e)[:80]}"
            ok = {nm: r[nm] for nm in backends if isinstance(r[nm], float)}
            for nm, t in ok.items():
                total[nm] += n * t
            for nm in backends:
                if nm not in ok:
                    total[nm] = float("nan")
            total["best_per_shape"] += n * min(ok.values()) if ok else float("nan")
            # FP16 Cast's "cudnn": cuDNN where it takes the shape, else flash.
            total["cudnn_else_flash"] = total.get("cudnn_else_flash", 0.0) + n * ok.get("cudnn", ok.get("flash", float("nan")))
            rows.append(r)
        return {"shapes": rows, "total": {k: round(v, 3) for k, v in total.items()}}

    def _micro_qkv(self, calls):
        """Self-attention q/k/v projections: three GEMMs against one over concatenated weights."""
        import torch.nn.functional as F

        uniq = {}
        for qs, ks, heads, skip in calls:
            if qs == ks:  # self-attention
                uniq[qs] = uniq.get(qs, 0) + 1
        rows, three, one = [], 0.0, 0.0
        for (b, sq, c), n in uniq.items():
            x = torch.randn(b * sq, c, device=DEV, dtype=DTYPE)
            ws = [torch.randn(c, c, device=DEV, dtype=DTYPE) * 0.02 for _ in range(3)]
            w3 = torch.cat(ws)
            t3 = _time_cuda(lambda: [F.linear(x, w) for w in ws])
            t1 = _time_cuda(lambda: F.linear(x, torch.cat(ws)).split(c, dim=-1))
            t1s = _time_cuda(lambda: F.linear(x, w3))
            rows.append({"m": b * sq, "c": c, "calls": n, "three_ms": round(t3, 4), "fused_with_cat_ms": round(t1, 4), "fused_ms": round(t1s, 4)})
            three += n * t3
            one += n * t1
        return {"shapes": rows, "total": {"three_gemms": round(three, 3), "fused_with_weight_cat": round(one, 3)}}

    def _micro_fp8(self, linears):
        """Every linear layer: fp16 F.linear against the fp8 path (activation quantization + _scaled_mm)."""
        import torch.nn.functional as F

        fp8 = self.mod("accel_core.fp8")
        uniq = {}
        for s in linears:
            uniq[s] = uniq.get(s, 0) + 1
        rows = []
        tot = {"fp16": 0.0, "fp8_mm_only": 0.0, "fp8_with_quant": 0.0}
        for (m, k, n), calls in uniq.items():
            x = torch.randn(m, k, device=DEV, dtype=DTYPE)
            lin = torch.nn.Linear(k, n, device=DEV, dtype=DTYPE)
            r = {"m": m, "k": k, "n": n, "calls": calls, "fp16": round(_time_cuda(lambda: F.linear(x, lin.weight, lin.bias)), 4)}
            if k % 16 == 0 and n % 16 == 0:
                q = fp8.FP8Linear(lin)
                xq, xs = fp8._quantize(x)
                r["fp8_mm_only"] = round(_time_cuda(lambda: torch._scaled_mm(xq, q.weight_fp8.t(), scale_a=xs, scale_b=q.weight_scale,
                                                                             out_dtype=DTYPE)), 4)
                r["fp8_with_quant"] = round(_time_cuda(lambda: q(x)), 4)
            else:
                r["fp8_mm_only"] = r["fp8_with_quant"] = r["fp16"]
            for key in tot:
                tot[key] += calls * r[key]
            rows.append(r)
        return {"shapes": rows, "total": {k: round(v, 3) for k, v in tot.items()}}


def _version(name):
    try:
        return importlib.import_module(name).__version__
    except Exception:
        return None


def rows_for(lv: Levers, args):
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    base = lv.base
    comfy = lv.mod("accel_core.hosts.comfy")
    cast = lv.mod("accel_core.hosts.comfy.cast")
    CompileConfig = lv.mod("accel_core.compiling").CompileConfig
    CastConfig = lv.mod("accel_core.casting").CastConfig
    node = lambda nid, *a: getattr(lv.nodes.NODE_CLASS_MAPPINGS[nid](), lv.nodes.NODE_CLASS_MAPPINGS[nid].FUNCTION)(*a)[0]  # noqa: E731
    ro = dict(backend="inductor", mode="reduce-overhead")

    def ours(model, **kw):
        return comfy.apply_compile(model, CompileConfig(**ro, **kw))

    def builtin(model):
        out = TorchCompileModel.execute(model, "inductor")
        return out[0] if isinstance(out, tuple) else out.result[0]

    def deepcache(model):
        return node("SDAccelDeepCache", model, 3, 0, 0.0, 1.0, "uniform")

    attention = "auto"
    micro = lv.record["micro"].get("attention", {}).get("total", {})
    timed = {{"cudnn_else_flash": "cudnn"}.get(k, k): v for k, v in micro.items() if k in ("flash", "cudnn_else_flash", "efficient") and v == v}
    if timed:
        attention = min(timed, key=timed.get)  # the fastest choice over the model's attention calls
        if attention != "flash" and timed[attention] > 0.97 * timed.get("flash", float("inf")):
            attention = "flash"  # within 3%: not worth a compile
    lv.record["meta"]["attention_row_backend"] = attention

    yield "eager", lambda: base, False
    # The node's default first: channels_last converts the regular copy that our nodes share.
    yield "Compile UNet (node default)", lambda: node("SDAccelCompileUNet", base, "inductor", "reduce-overhead", False, False), False
    yield "Compile UNet + channels_last", lambda: ours(base, channels_last=True), args.profile
    yield "FP16 Cast fp8 + Compile UNet", lambda: ours(cast.apply_cast(base, CastConfig(dtype="fp8", channels_last=True))), False
    if attention not in ("auto", "flash"):
        yield f"FP16 Cast attention={attention} + Compile UNet", lambda: ours(cast.apply_cast(base, CastConfig(dtype="fp16", attention=attention))), False
    yield "Compile UNet + channels_last + skip-module guards", lambda: ours(base, channels_last=True, guards="skip-module"), False
    yield "ComfyUI TorchCompileModel (built-in)", lambda: builtin(base), False
    if args.wavespeed:
        ws = _wavespeed(lv, args.wavespeed)
        yield "WaveSpeed Compile Model+ reduce-overhead", lambda: ws(base), False
    yield "DeepCache 3 + Compile UNet + channels_last", lambda: ours(deepcache(base), channels_last=True), False
    yield "FP16 Cast + Compile UNet", lambda: ours(cast.apply_cast(base, CastConfig(dtype="fp16"))), False


def _wavespeed(lv, folder):
    """Comfy-WaveSpeed's Compile Model+ (EnhancedCompileModel) with mode reduce-overhead, as a user fills it in."""
    peers = importlib.import_module(lv.pack + ".cli.bench.peers")
    return lambda model: peers.wavespeed_compile(model, folder, "reduce-overhead")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--arch", choices=sorted(SIDE), default="sd15")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rows", default="", help="comma-separated row names (and 'micro'); default: all")
    p.add_argument("--profile", action="store_true", help="profile the 'Compile UNet + channels_last' row")
    p.add_argument("--wavespeed", default="", help="a Comfy-WaveSpeed folder, for its Compile Model+ row")
    p.add_argument("--no-dynamic", action="store_true")
    p.add_argument("--smoke", action="store_true", help="CPU, dynamo disabled, 2 steps: plumbing only")
    args = p.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    if args.smoke:
        global DEV, DTYPE
        args.steps, args.repeats, args.no_dynamic = 2, 1, True
        torch._dynamo.config.disable = True
        DEV, DTYPE = "cpu", torch.float32
    lv = Levers(args)
    lv.micro()
    if args.rows == ["micro"]:
        return 0
    for name, make, prof in rows_for(lv, args):
        lv.row(name, make, profile=prof)
    return 0


if __name__ == "__main__":
    sys.exit(main())
