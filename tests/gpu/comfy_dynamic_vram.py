"""Every SD Accel node and stack on ComfyUI with DynamicVRAM, on an NVIDIA GPU, one process per case.

    python3 tests/gpu/comfy_dynamic_vram.py --comfyui /path/to/ComfyUI --out OUT [--cases compile,lcm] [--no-dynamic]

Boots ComfyUI the way its main.py does on NVIDIA (comfy_aimdo.control.init, init_devices,
CoreModelPatcher = ModelPatcherDynamic, aimdo_enabled), writes an SD1.5 checkpoint of seeded random
weights and two LoRAs, and loads the checkpoint from the file with ComfyUI's own loader. Each case
runs in a child process with PYTHONFAULTHANDLER=1, so a segmentation fault ends the child and the
parent records a crash. A case checks its output against eager ComfyUI in the same process, that
swaps compile nothing, that the original weights are back bit for bit, and records ms/step and
peak memory. The parent writes OUT/results.json and prints a table.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))
import comfy_harness as harness  # noqa: E402  (checkpoint/LoRA writers, conditioning)

STEPS, CFG, SIZE = 20, 7.0, 512
TOL = {"compile": 0.01, "deepcache": 0.03, "lora": 2e-3}


# --- ComfyUI, booted as main.py does ---------------------------------------------------------------

def av_stand_in():
    """PyAV is imported by comfy_api for video only; a module answering any attribute stands in."""
    try:
        import av  # noqa: F401

        return
    except ImportError:
        pass

    class _Any(type):
        def __getattr__(cls, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return cls

    class Stand(metaclass=_Any):
        pass

    def module(name):
        m = types.ModuleType(name)
        m.__getattr__ = lambda attr: Stand if not attr.startswith("__") else (_ for _ in ()).throw(AttributeError(attr))
        m.__path__ = []
        # a spec, as an imported module has: importlib.util.find_spec("av") (diffusers' probe) raises without one
        m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = m
        return m

    for name in ("av", "av.container", "av.subtitles", "av.subtitles.stream", "av.video", "av.video.reformatter", "av.audio", "av.audio.frame"):
        module(name)


def boot(root: str, dynamic: bool):
    sys.path.insert(0, root)
    av_stand_in()
    from comfy.cli_args import args

    import comfy_aimdo.control as aimdo

    if dynamic:
        for kw in ({"simple_vram_headroom": None, "nvml_pressure": True}, {"simple_vram_headroom": None}, {}):
            try:
                aimdo.init(**kw)
                break
            except TypeError:
                continue
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    if dynamic:
        devices = mm.get_all_torch_devices()
        try:
            ok = aimdo.init_devices((d.index, int(args.vram_headroom * 1024 ** 3)) for d in devices)
        except TypeError:
            ok = aimdo.init_devices(d.index for d in devices)
        if not ok:
            raise RuntimeError("comfy_aimdo.control.init_devices failed: no DynamicVRAM on this machine")
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    import asyncio
    import inspect

    import nodes

    ok = nodes.load_custom_node(str(REPO))
    if inspect.iscoroutine(ok):
        ok = asyncio.run(ok)
    if not ok:
        raise RuntimeError("ComfyUI could not import SD Accel")
    return nodes


# --- one case ----------------------------------------------------------------------------------------

class Ctx:
    def __init__(self, nodes, files: dict, dynamic: bool):
        import comfy.sd
        import folder_paths

        self.nodes, self.files, self.dynamic = nodes, files, dynamic
        folder_paths.add_model_folder_path("loras", files["loras"])
        self.load = lambda: comfy.sd.load_checkpoint_guess_config(files["checkpoint"], output_vae=False, output_clip=False)[0]
        self.base = self.load()
        self.record = {"dynamic": self.base.is_dynamic() if hasattr(self.base, "is_dynamic") else False, "checks": [], "rows": {}}
        self._eager = None

    def node(self, node_id, *args):
        cls = self.nodes.NODE_CLASS_MAPPINGS[node_id]
        fn = getattr(cls(), cls.FUNCTION)
        return fn(*args)

    def sample(self, model, steps=STEPS, cfg=CFG, sampler="euler", scheduler="normal", callback=None):
        pos, neg = harness.conditioning(dim=768)
        latent = {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            if callback is None:
                out = self.nodes.common_ksampler(model, 42, steps, cfg, sampler, scheduler, pos, neg, latent)
            else:
                out = _sample_with_callback(model, steps, cfg, sampler, scheduler, pos, neg, latent, callback)
        torch.cuda.synchronize()
        return out[0]["samples"].clone(), time.perf_counter() - t0

    def timed(self, name, model, runs=3, **kw):
        """First run, then the best of `runs`; records ms/step, peak memory and compiled frames."""
        from torch._dynamo.utils import counters

        torch.cuda.reset_peak_memory_stats()
        frames0 = counters["frames"].get("ok", 0)
        first_out, first = self.sample(model, **kw)
        times = []
        for _ in range(runs):
            out, dt = self.sample(model, **kw)
            times.append(dt)
        best = min(times)
        free, total = torch.cuda.mem_get_info()
        steps = kw.get("steps", STEPS)
        self.record["rows"][name] = {"first_s": round(first, 3), "ms_per_step": round(1000 * best / steps, 2),
                                     "per_image_s": round(best, 4), "peak_alloc_mb": round(torch.cuda.max_memory_allocated() / 2 ** 20),
                                     "device_used_mb": round((total - free) / 2 ** 20), "frames_compiled": counters["frames"].get("ok", 0) - frames0,
                                     "first_vs_steady_rel_err": round(harness.rel_err(first_out, out), 6)}
        return out  # a steady run's output: ComfyUI's first run of a DynamicVRAM model computes slightly differently

    def eager(self):
        if self._eager is None:
            self._eager = self.timed("eager", self.base)
        return self._eager

    def check(self, name, value, limit, ok=None):
        ok = (value <= limit) if ok is None else ok
        self.record["checks"].append({"check": name, "value": value, "limit": limit, "ok": bool(ok)})

    def close_to(self, name, out, ref, tol):
        self.check(f"{name}: rel err", round(harness.rel_err(out, ref), 6), tol)

    def originals_back(self, model, label):
        """The weights of `model`'s UNet equal the checkpoint file bit for bit (after an unload)."""
        import comfy.model_management as mm
        from safetensors.torch import load_file

        mm.unload_all_models()
        sd = load_file(self.files["checkpoint"])
        unet = model.model.diffusion_model
        bad = [n for n, p in unet.state_dict().items() if not torch.equal(p.detach().cpu().to(sd[f"model.diffusion_model.{n}"].dtype), sd[f"model.diffusion_model.{n}"])]
        self.check(f"{label}: weights equal the file", len(bad), 0)

    def steady(self, model):
        """The output of a second run (after a load, ComfyUI's first DynamicVRAM run computes slightly differently)."""
        self.sample(model)
        return self.sample(model)[0]

    def settle(self, model, max_s=20.0):
        """Sample until two runs in a row are within 5% of the best: for a few seconds after a compile
        the process samples slower (inductor's workers winding down), which no swap should be charged."""
        best, calm, t0 = None, 0, time.perf_counter()
        while time.perf_counter() - t0 < max_s and calm < 2:
            dt = self.sample(model)[1]
            calm = calm + 1 if best is not None and dt <= 1.05 * best else 0
            best = dt if best is None else min(best, dt)

    def regular(self):
        """The base model as a regular (classic-patcher) copy, as ComfyUI's own TorchCompileModel makes it."""
        if not self.record["dynamic"]:
            return self.base
        if getattr(self, "_regular", None) is None:
            self._regular = self.base.clone(disable_dynamic=True)
        return self._regular

    def base_unchanged(self):
        out = self.steady(self.base)
        self.close_to("base model afterwards", out, self.eager(), 1e-5)


def _sample_with_callback(model, steps, cfg, sampler, scheduler, pos, neg, latent, callback):
    import comfy.sample
    import comfy.utils

    x = latent["samples"]
    noise = comfy.sample.prepare_noise(x, 42)
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, x, callback=callback, disable_pbar=True, seed=42)
    return ({"samples": samples},)


def _copy_cost(ctx, fn):
    import psutil

    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    m = fn()
    ctx.record["regular_copy"] = {"node_s": round(time.perf_counter() - t0, 2), "rss_mb": round((psutil.Process().memory_info().rss - rss0) / 2 ** 20)}
    return m


COMPILE = ("inductor", "reduce-overhead", False, False)


def case_compile(ctx):
    ref = ctx.eager()
    m = _copy_cost(ctx, lambda: ctx.node("SDAccelCompileUNet", ctx.base, *COMPILE)[0])
    ctx.check("compiled on a regular copy", int(m.is_dynamic()), 0)
    ctx.close_to("compile", ctx.timed("compile", m), ref, TOL["compile"])
    ctx.base_unchanged()


def case_cast_compile(ctx):
    ref = ctx.eager()
    m = ctx.node("SDAccelFP16Cast", ctx.base, "fp16", True, "auto")[0]
    m = ctx.node("SDAccelCompileUNet", m, *COMPILE)[0]
    ctx.close_to("cast + compile", ctx.timed("cast+compile", m), ref, TOL["compile"])
    ctx.base_unchanged()


def case_cudnn_compile(ctx):
    """FP16 Cast attention=cudnn, then Compile UNet: one graph (cuDNN attention inside it), beside attention=auto."""
    ref = ctx.eager()
    for attention in ("auto", "cudnn"):
        m = ctx.node("SDAccelFP16Cast", ctx.base, "fp16", True, attention)[0]
        m = ctx.node("SDAccelCompileUNet", m, *COMPILE)[0]
        out = ctx.timed(f"cast {attention} + compile", m)
        ctx.close_to(f"cast {attention} + compile", out, ref, TOL["compile"])
        ctx.check(f"cast {attention} + compile: frames compiled", ctx.record["rows"][f"cast {attention} + compile"]["frames_compiled"], 2)
    ctx.base_unchanged()


def case_deepcache_compile(ctx):
    ref = ctx.eager()
    m = ctx.node("SDAccelDeepCache", ctx.base, 3, 0, 0.0, 1.0, "uniform")[0]
    ctx.close_to("deepcache 3 (eager)", ctx.timed("deepcache3 eager", m), ref, TOL["deepcache"])
    m = ctx.node("SDAccelCompileUNet", m, *COMPILE)[0]
    ctx.close_to("deepcache 3 + compile", ctx.timed("deepcache3+compile", m), ref, TOL["deepcache"])
    ctx.base_unchanged()


def _hotswap(ctx, compiled: bool):
    """A -> B -> none -> A. The reference is ComfyUI's own LoRA on a regular copy of the checkpoint (what
    the hot-swap samples); against the DynamicVRAM model it is recorded, not checked, since a regular copy
    and a DynamicVRAM model differ by the host's own casting whatever LoRA is applied."""
    from torch._dynamo.utils import counters

    base = ctx.node("SDAccelCompileUNet", ctx.base, *COMPILE)[0] if compiled else ctx.base
    ctx.eager()
    tag = "compiled" if compiled else "plain"
    ctx.timed(f"{tag} (no LoRA)", base)
    prev = base
    for i, name in enumerate(("A", "B", None, "A")):
        lora = ctx.files[name] if name else None
        label = f"{tag} swap {i + 1} -> {name or 'none'}"
        m = ctx.node("SDAccelLoRAHotSwap", base, lora, 1.0)[0] if lora else base
        ref = ctx.steady(ctx.node("LoraLoaderModelOnly", ctx.regular(), lora, 1.0)[0] if lora else ctx.regular())
        if ctx.record["dynamic"] and i < 3:
            dyn = ctx.steady(ctx.node("LoraLoaderModelOnly", ctx.base, lora, 1.0)[0] if lora else ctx.base)
            ctx.record.setdefault("vs_dynamic_lora", {})[label] = round(harness.rel_err(ref, dyn), 6)
        ctx.settle(prev)  # the previous LoRA, steady again: the references' loads are not the swap's cost
        frames0 = counters["frames"].get("ok", 0)
        out = ctx.timed(label, m)
        row = ctx.record["rows"][label]
        ctx.close_to(f"{label} vs ComfyUI's LoRA", out, ref, TOL["lora"] if not compiled else TOL["lora"] + TOL["compile"] / 5)
        ctx.check(f"{label}: frames compiled", counters["frames"].get("ok", 0) - frames0, 0)
        ctx.check(f"{label}: first run / steady", round(row["first_s"] / row["per_image_s"], 3), 1.2)
        prev = m
    ctx.originals_back(base, f"{tag} regular copy")
    ctx.base_unchanged()


def case_hotswap_compiled(ctx):
    _hotswap(ctx, True)


def case_hotswap_plain(ctx):
    _hotswap(ctx, False)


def case_loraloader_after_compile(ctx):
    """ComfyUI's LoraLoaderModelOnly after Compile (reduce-overhead), A -> B -> none -> A: no frame compiles
    again (Compile sets weight_inplace_update only where ComfyUI's patched Parameters would differ from
    the model's). Each switch moves the UNet off the GPU and back (ComfyUI's unpatch), so CUDA graphs
    re-record: the first run / steady ratio is recorded, not checked."""
    from torch._dynamo.utils import counters

    compiled = ctx.node("SDAccelCompileUNet", ctx.base, *COMPILE)[0]
    ctx.record["weight_inplace_update"] = bool(compiled.weight_inplace_update)
    ctx.timed("compiled (no LoRA)", compiled)
    for i, name in enumerate(("A", "B", None, "A")):
        lora = ctx.files[name] if name else None
        label = f"loraloader after compile {i + 1} -> {name or 'none'}"
        m = ctx.node("LoraLoaderModelOnly", compiled, lora, 1.0)[0] if lora else compiled
        ref = ctx.steady(ctx.node("LoraLoaderModelOnly", ctx.regular(), lora, 1.0)[0] if lora else ctx.regular())
        frames0 = counters["frames"].get("ok", 0)
        out = ctx.timed(label, m)
        ctx.close_to(f"{label} vs ComfyUI's LoRA", out, ref, TOL["lora"] + TOL["compile"] / 5)
        ctx.check(f"{label}: frames compiled", counters["frames"].get("ok", 0) - frames0, 0)
    ctx.base_unchanged()


def case_lcm(ctx):
    import comfy_extras.nodes_model_advanced as adv

    pos, neg = harness.conditioning(dim=768)
    latent = {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)}
    lcm = ctx.files["A"]
    ref_model = adv.ModelSamplingDiscrete().patch(ctx.node("LoraLoaderModelOnly", ctx.base, lcm, 1.0)[0], "lcm", False)
    ref_model = ref_model[0] if isinstance(ref_model, tuple) else ref_model.result[0]
    ref = ctx.timed("eager LCM-LoRA (ComfyUI)", ref_model, steps=4, cfg=1.5, sampler="lcm", scheduler="sgm_uniform")
    compiled = ctx.node("SDAccelCompileUNet", ctx.base, *COMPILE)[0]
    for tag, model in (("LCM node", ctx.base), ("LCM node + compile", compiled)):
        def run():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = ctx.node("SDAccelLCMLoRASampler", model, pos, neg, latent, lcm, 1.0, 42, 4, 1.5, 1.0)[0]["samples"].clone()
            torch.cuda.synchronize()
            return out, time.perf_counter() - t0
        out, first = run()
        best = min(run()[1] for _ in range(3))
        ctx.record["rows"][tag] = {"first_s": round(first, 3), "per_image_s": round(best, 4), "ms_per_step": round(250 * best, 2)}
        ctx.close_to(tag, out, ref, TOL["lora"] + TOL["compile"] / 5)
    ctx.originals_back(compiled, "LCM regular copy")
    ctx.base_unchanged()


def case_cast_after_sampling(ctx):
    ref = ctx.eager()  # the base model has sampled (its weights are resident)
    m = ctx.node("SDAccelFP16Cast", ctx.base, "fp16", True, "auto")[0]
    ctx.close_to("cast after sampling", ctx.timed("cast after sampling", m), ref, TOL["compile"])
    ctx.base_unchanged()


def case_unload_reload(ctx):
    import comfy.model_management as mm

    ref = ctx.eager()
    m = ctx.node("SDAccelLoRAHotSwap", ctx.node("SDAccelCompileUNet", ctx.base, *COMPILE)[0], ctx.files["A"], 1.0)[0]
    first, _ = ctx.sample(m)
    mm.unload_all_models()
    again = ctx.timed("compile + LoRA after unload", m)
    ctx.check("same output after unload/reload: rel err", round(harness.rel_err(again, first), 6), 1e-3)
    ctx.originals_back(m, "after unload")
    mm.unload_all_models()
    ctx.close_to("base after unload", ctx.steady(ctx.base), ref, 1e-5)


def case_interrupt(ctx):
    import comfy.model_management as mm

    ctx.eager()
    m = ctx.node("SDAccelLoRAHotSwap", ctx.node("SDAccelCompileUNet", ctx.base, *COMPILE)[0], ctx.files["A"], 1.0)[0]
    ctx.sample(m)

    def stop(step, *a):
        if step == STEPS // 2:
            raise mm.InterruptProcessingException()

    try:
        ctx.sample(m, callback=stop)
        ctx.check("interrupted", 0, 1, ok=False)
    except mm.InterruptProcessingException:
        ctx.check("interrupted mid-run", 1, 1)
    ctx.originals_back(m, "after an interrupted run")
    ctx.base_unchanged()


def case_two_models(ctx):
    """A swap on one model while another model of the same checkpoint is loaded."""
    ref = ctx.eager()
    other = ctx.load()
    ctx.sample(other)  # its first run
    m = ctx.node("SDAccelLoRAHotSwap", ctx.base, ctx.files["B"], 1.0)[0]
    ctx.sample(m)
    ctx.close_to("the other model of the checkpoint", ctx.steady(other), ref, 1e-5)
    ctx.originals_back(m, "hot-swap copy")
    ctx.base_unchanged()


def case_speed(ctx):
    """Side by side in one process: eager, ComfyUI's TorchCompileModel, ours."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    ref = ctx.eager()
    builtin = TorchCompileModel.execute(ctx.base, "inductor")
    builtin = builtin[0] if isinstance(builtin, tuple) else builtin.result[0]
    ctx.close_to("built-in TorchCompileModel", ctx.timed("built-in TorchCompileModel", builtin), ref, TOL["compile"])
    ours = ctx.node("SDAccelCompileUNet", ctx.base, *COMPILE)[0]
    ctx.close_to("Compile UNet", ctx.timed("Compile UNet", ours), ref, TOL["compile"])
    cast = ctx.node("SDAccelCompileUNet", ctx.node("SDAccelFP16Cast", ctx.base, "fp16", True, "auto")[0], *COMPILE)[0]
    ctx.close_to("FP16 Cast + Compile UNet", ctx.timed("FP16 Cast + Compile UNet", cast), ref, TOL["compile"])
    dc = ctx.node("SDAccelCompileUNet", ctx.node("SDAccelDeepCache", ctx.base, 3, 0, 0.0, 1.0, "uniform")[0], *COMPILE)[0]
    ctx.close_to("DeepCache 3 + Compile UNet", ctx.timed("DeepCache 3 + Compile UNet", dc), ref, TOL["deepcache"])
    # the stack aimed at DeepCache's <= 3.5 ms/step: cuDNN attention in the one compiled graph, under the cache
    fast = ctx.node("SDAccelFP16Cast", ctx.base, "fp16", True, "cudnn")[0]
    fast = ctx.node("SDAccelCompileUNet", ctx.node("SDAccelDeepCache", fast, 3, 0, 0.0, 1.0, "uniform")[0], *COMPILE)[0]
    ctx.close_to("FP16 Cast cudnn + DeepCache 3 + Compile UNet", ctx.timed("FP16 Cast cudnn + DeepCache 3 + Compile UNet", fast), ref,
                 TOL["deepcache"])
    rows = ctx.record["rows"]
    ctx.record["vs_builtin"] = round(rows["built-in TorchCompileModel"]["per_image_s"] / rows["Compile UNet"]["per_image_s"], 2)


class _PeakUsed:
    """The device's peak used memory (total - free) while the block runs, polled from a thread: a
    DynamicVRAM model's weights live outside torch's allocator, so max_memory_allocated misses them."""

    def __enter__(self):
        import threading

        self.peak, self._stop = 0, threading.Event()

        def poll():
            while not self._stop.is_set():
                free, total = torch.cuda.mem_get_info()
                self.peak = max(self.peak, total - free)
                self._stop.wait(0.005)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _memory(ctx, name, make):
    """One configuration alone in its process: its peak device memory, to compare process against process."""
    with _PeakUsed() as used:
        ctx.timed(name, make())
    ctx.record["peak_device_used_mb"] = round(used.peak / 2 ** 20)


def case_memory_eager(ctx):
    _memory(ctx, "eager", lambda: ctx.base)


def case_memory_compile(ctx):
    _memory(ctx, "Compile UNet", lambda: ctx.node("SDAccelCompileUNet", ctx.base, *COMPILE)[0])


def case_memory_builtin(ctx):
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    def make():
        m = TorchCompileModel.execute(ctx.base, "inductor")
        return m[0] if isinstance(m, tuple) else m.result[0]

    _memory(ctx, "built-in TorchCompileModel", make)


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


# --- parent --------------------------------------------------------------------------------------------

def prepare(root: str, work: Path) -> dict:
    """The checkpoint and LoRA files (written once; children load them)."""
    files = {"checkpoint": str(work / "sd15_random.safetensors"), "loras": str(work / "loras"), "A": "lora_a.safetensors", "B": "lora_b.safetensors"}
    if not Path(files["checkpoint"]).exists():
        sys.path.insert(0, root)
        av_stand_in()
        harness.write_sd15_checkpoint(Path(files["checkpoint"]))
        import comfy.sd

        model = comfy.sd.load_checkpoint_guess_config(files["checkpoint"], output_vae=False, output_clip=False)[0]
        Path(files["loras"]).mkdir(exist_ok=True)
        for name, seed in (("A", 1), ("B", 2)):
            harness.write_kohya_lora(Path(files["loras"]) / files[name], harness.lora_targets(model), seed=seed)
    return files


def child(args) -> int:
    files = json.loads(args.files)
    nodes = boot(args.comfyui, not args.no_dynamic)
    ctx = Ctx(nodes, files, not args.no_dynamic)
    try:
        CASES[args.child](ctx)
        ctx.record["status"] = "ok" if all(c["ok"] for c in ctx.record["checks"]) else "failed"
    except Exception as e:  # recorded, not raised: the parent reports every case
        import traceback

        ctx.record["status"] = "error"
        ctx.record["error"] = "".join(traceback.format_exception(e))[-3000:]
    ctx.record["peak_alloc_mb_process"] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
    Path(args.result).write_text(json.dumps(ctx.record, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", required=True, help="the ComfyUI tree (0.33 for DynamicVRAM)")
    p.add_argument("--out", required=True, help="folder for results.json and the child logs")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)} (default: all)")
    p.add_argument("--no-dynamic", action="store_true", help="classic ModelPatcher (as --disable-dynamic-vram)")
    p.add_argument("--work", default=None, help="folder for the generated checkpoint and LoRAs (default: a temp folder)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; the cases are {', '.join(CASES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="sd_accel_dyn_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files = prepare(args.comfyui, work)
    print(f"checkpoint and LoRAs ready in {time.perf_counter() - t0:.1f}s", flush=True)
    results = {}
    for case in cases:
        result = out / f"{case}.json"
        cmd = [sys.executable, __file__, "--comfyui", args.comfyui, "--out", str(out), "--child", case, "--files", json.dumps(files), "--result", str(result)]
        if args.no_dynamic:
            cmd.append("--no-dynamic")
        t0 = time.perf_counter()
        with open(out / f"{case}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONFAULTHANDLER="1")).returncode
        rec = json.loads(result.read_text()) if result.exists() else {"status": "crashed", "returncode": rc,
                                                                     "log_tail": (out / f"{case}.log").read_text()[-3000:]}
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        results[case] = rec
        bad = [c for c in rec.get("checks", []) if not c["ok"]]
        print(f"{case:22s} {rec['status']:8s} {rec['wall_s']:6.1f}s  " + "; ".join(f"{c['check']}={c['value']} (limit {c['limit']})" for c in bad), flush=True)
        if rec["status"] in ("error", "crashed"):
            print((rec.get("error") or rec.get("log_tail", ""))[-1500:], flush=True)
        for name, row in rec.get("rows", {}).items():
            print(f"    {name:34s} {row.get('ms_per_step', 0):7.2f} ms/step  first {row.get('first_s', 0):6.2f}s  "
                  f"peak {row.get('peak_alloc_mb', '-')} MB  frames {row.get('frames_compiled', '-')}", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    eager_mb = results.get("memory_eager", {}).get("peak_device_used_mb")
    for case in ("memory_compile", "memory_builtin"):
        mb = results.get(case, {}).get("peak_device_used_mb")
        if eager_mb and mb:
            results[case]["vs_eager"] = round(mb / eager_mb, 3)
            print(f"{case}: peak device memory {mb} MB = {mb / eager_mb:.3f}x eager's {eager_mb} MB", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
