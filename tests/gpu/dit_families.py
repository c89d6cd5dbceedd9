"""Compile and FP8 on the DiT families in ComfyUI with DynamicVRAM, on an NVIDIA GPU, one process per case.

    python3 tests/gpu/dit_families.py --comfyui .hosts/ComfyUI-0.33.0 --out $OUT --family flux --case eager,ours
    python3 tests/gpu/dit_families.py --comfyui .hosts/ComfyUI-0.33.0 --out /tmp/o --family flux --tiny   # CPU smoke test

Builds the family's full-size model (Flux.1-dev 11.9B, ...) from ComfyUI's own class with seeded
random bf16 weights (the benchmark's builder, sd_accel/cli/bench/dit.py: `sd-accel bench --host comfy
--preset flux-1024` has the same rows in one process), saves it as safetensors in --work (kept: the next command reuses it) and
loads it with `comfy.sd.load_diffusion_model` with DynamicVRAM on, as main.py boots it. Each
case runs in a child process (PYTHONFAULTHANDLER=1: a crash ends only that row) and records:
first image seconds (compile included), ms/step (best of 2 steady runs), peak GPU memory, and
the relative error of one model call against eager bf16 (a 1-step euler run returns the
model's denoised prediction, so the error is one call's), and the ms of each step of one more image
with the steps a step cache ran cached (where a cache's time goes). Cases:

  eager         ComfyUI as loaded (DynamicVRAM streaming)
  builtin       ComfyUI's TorchCompileModel (comfy_extras/nodes_torch_compile.py) on its regular copy
  ours          SD Accel Compile Model at the node's defaults (regional: one compiled block per kind)
  ours_fp8      SD Accel FP16 Cast fp8 (accel_core/fp8.py FP8Linear) + Compile Model
  ours_cache    Compile Model + Step Cache (fixed, interval 3: the middle blocks run one step in 3)
  ours_forecast Compile Model + Step Cache (forecast, interval 3)
  cache_only    Step Cache alone (fixed, interval 3) on the DynamicVRAM model as loaded (Z-Image: its
                BlockHooks are object patches over weights DynamicVRAM streams)
  limit24       the GPU limited to 24 GB (set_per_process_memory_fraction): eager runs streamed,
                Compile Model must refuse the regular copy with its message, not run out of memory

Results: OUT/<family>_<case>.json and a table on stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO / "tests" / "gpu"))

CASES = ("eager", "builtin", "ours", "ours_fp8", "ours_cache", "ours_forecast", "cache_only", "limit24")
GB = 1024 ** 3
FAMILIES = ("flux", "qwen_image", "zimage", "wan", "ltx")


def _package():
    """sd_accel.cli.bench (the benchmark's model builder) of this checkout (through a link when `sd_accel` is not it)."""
    import importlib.util

    found = importlib.util.find_spec("sd_accel") if "sd_accel" not in sys.modules else None
    if "sd_accel" not in sys.modules and (found is None or Path(found.origin).resolve().parent != REPO):
        import tempfile

        link_dir = Path(tempfile.mkdtemp(prefix="sd_accel_link_"))
        (link_dir / "sd_accel").symlink_to(REPO, target_is_directory=True)
        sys.path.insert(0, str(link_dir))
    from sd_accel.cli.bench import comfy_presets, dit

    return dit, comfy_presets


def spec(family: str, tiny: bool) -> dict:
    """The family's model spec (sd_accel.cli.bench.dit) with the bench preset's steps and CFG."""
    dit, presets = _package()
    s = dit.spec(family, tiny)
    p = next(v for v in presets.PRESETS.values() if v.arch == family and v.tiny == tiny)
    return dict(context=s.context, extra=s.extra, text_mask=s.text_mask, latent=s.latent, steps=2 if tiny else p.steps, cfg=1.0 if tiny else p.cfg)


# --- the model file ------------------------------------------------------------------------------

def write_model(family: str, tiny: bool, work: Path) -> Path:
    """Seeded random weights of the family's ComfyUI class (the bench's builder), saved once in `work`."""
    path = work / f"{family}{'_tiny' if tiny else ''}.safetensors"
    if path.is_file():
        return path
    import comfy.utils

    dit, _ = _package()
    dev = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    sd = dit.build_weights(family, tiny, 0, dev)
    tmp = path.with_suffix(".part")
    comfy.utils.save_torch_file(sd, str(tmp))
    tmp.rename(path)
    del sd
    return path


# --- one case --------------------------------------------------------------------------------------

def _load(path: Path, family: str, tiny: bool):
    import comfy.sd

    try:
        return comfy.sd.load_diffusion_model(str(path))
    except (AssertionError, ValueError, RuntimeError):  # --tiny: detection fixes Z-Image's and Qwen-Image's full widths (before
        # 0.33 also Flux's heads and width); build the class from the config
        if not tiny:
            raise
        import comfy.utils
        import dit_models

        model = dit_models.build(family)
        model.model.diffusion_model.load_state_dict(comfy.utils.load_torch_file(str(path)))
        return model


class Ctx:
    def __init__(self, nodes, family: str, tiny: bool, path: Path, profile: Path | None = None):
        import comfy.sd

        self.nodes, self.family, self.tiny, self.profile = nodes, family, tiny, profile
        self.spec = spec(family, tiny)
        self.load = lambda: _load(path, family, tiny)
        self.cuda = torch.cuda.is_available() and not tiny

    def inputs(self):
        g = torch.Generator().manual_seed(3)
        n, w = self.spec["context"]
        extra = {k: torch.randn(v, generator=g) if isinstance(v, tuple) else v for k, v in self.spec["extra"].items()}
        if self.spec["text_mask"]:  # Lumina 2 hosts take the text length from it; LTX-Video requires it
            extra["attention_mask"] = torch.ones(1, n, dtype=torch.long)
        pos = [[torch.randn((1, n, w), generator=g), extra]]
        neg = [[torch.randn((1, n, w), generator=g), dict(extra)]]
        return pos, neg, {"samples": torch.zeros(self.spec["latent"])}

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def sample(self, model, steps=None):
        pos, neg, latent = self.inputs()
        steps = steps or self.spec["steps"]
        self.sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.nodes.common_ksampler(model, 42, steps, self.spec["cfg"], "euler", "simple", pos, neg, latent)
        self.sync()
        return out[0]["samples"].float().clone(), time.perf_counter() - t0

    def measure(self, model, label: str) -> dict:
        from torch._dynamo.utils import counters

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        graphs0 = counters["stats"]["unique_graphs"]
        call, first = self.sample(model, steps=1)  # one model call: euler's only step returns the denoised prediction
        times = [self.sample(model)[1] for _ in range(2)]
        row = {"first_image_s": round(first, 2), "ms_per_step": round(1000 * min(times) / self.spec["steps"], 2),
               "graphs_compiled": counters["stats"]["unique_graphs"] - graphs0, "recompiles": sum(counters["recompiles"].values()),
               **self.step_times(model, label)}
        if self.cuda:
            row["peak_alloc_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
        return row, call


    def step_times(self, model, label: str) -> dict:
        """One more image, synchronised after every step (ComfyUI's preview callback, replaced for this run):
        each step's ms, and the steps a step cache ran cached, so a cache's cost per cached step is read off."""
        import importlib

        import latent_preview

        pack = self.nodes.NODE_CLASS_MAPPINGS["SDAccelStepCache"].__module__.rsplit(".nodes.", 1)[0]
        events = importlib.import_module(pack + ".accel_core.events")
        stats: list = []
        listener = lambda ev, data: stats.append(data) if ev == "stepcache_stats" else None  # noqa: E731
        marks: list = []
        prof, where = self._profiler(label)

        def timed(*_a, **_k):
            def cb(step, x0, x, total):
                self.sync()
                marks.append(time.perf_counter())
                if prof is not None:
                    prof.step()
            return cb

        orig = latent_preview.prepare_callback
        latent_preview.prepare_callback = timed
        events.subscribe(listener)
        try:
            with prof if prof is not None else contextlib.nullcontext():
                self.sync()
                marks.append(time.perf_counter())
                self.sample(model)
        finally:
            latent_preview.prepare_callback = orig
            events.unsubscribe(listener)
        out = {"step_ms": [round(1000 * (b - a), 2) for a, b in zip(marks, marks[1:])]}
        if prof is not None:
            out["profile"] = str(where)
        if stats:
            out["cached_steps"] = stats[-1].get("cached_steps")
        return out


    def _profiler(self, label: str):
        """--profile: torch.profiler over steps 4-6 of the timed image (at the Step Cache's defaults two cached
        steps and a full one; their step_ms include the profiler's overhead); the op tables and the trace go to OUT."""
        if self.profile is None:
            return None, None
        where = self.profile.with_name(f"{self.profile.name}_{label}.txt")
        from torch.profiler import ProfilerActivity, profile, schedule

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])

        def ready(p):
            p.export_chrome_trace(str(where.with_suffix(".trace.json")))
            by = "cuda_time_total" if self.cuda else "cpu_time_total"
            where.write_text(p.key_averages().table(sort_by=by, row_limit=30) + "\n"
                                    + p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))

        n = self.spec["steps"]
        plan = schedule(wait=3, warmup=1, active=3) if n >= 7 else schedule(wait=0, warmup=0, active=n)  # --tiny: every step
        return profile(activities=acts, schedule=plan, on_trace_ready=ready), where


def _builtin(model):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    try:
        from comfy_extras.nodes_torch_compile import skip_torch_compile_dict
        options = {"guard_filter_fn": skip_torch_compile_dict}
    except ImportError:
        options = None
    m = model.clone(disable_dynamic=True) if getattr(model, "is_dynamic", lambda: False)() else model.clone()
    set_torch_compile_wrapper(model=m, backend="inductor", options=options)
    return m


def run_case(ctx: Ctx, case: str) -> dict:
    import comfy.model_management as mm

    if case == "limit24":
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, 24 * GB / total))
    base = ctx.load()
    rec = {"family": ctx.family, "case": case, "dynamic": bool(getattr(base, "is_dynamic", lambda: False)()),
           "device": torch.cuda.get_device_name() if ctx.cuda else "cpu", "torch": torch.__version__}
    ref_row, ref_call = ctx.measure(base, "eager")
    rec["eager"] = ref_row
    if case == "eager":
        return rec
    mm.unload_all_models()
    if case == "builtin":
        model = _builtin(base)
    elif case in ("ours", "limit24"):
        model = _node(ctx.nodes, "SDAccelCompileUNet", base)
    elif case == "ours_fp8":
        model = _node(ctx.nodes, "SDAccelCompileUNet", _node(ctx.nodes, "SDAccelFP16Cast", base, dtype="fp8", channels_last=False))
    elif case in ("ours_cache", "ours_forecast"):
        mode = "fixed" if case == "ours_cache" else "forecast"
        model = _node(ctx.nodes, "SDAccelStepCache", _node(ctx.nodes, "SDAccelCompileUNet", base), mode=mode, interval=3)
    elif case == "cache_only":
        model = _node(ctx.nodes, "SDAccelStepCache", base, mode="fixed", interval=3)
    else:
        raise SystemExit(f"unknown case {case!r}; expected one of {', '.join(CASES)}")
    rec["refused"] = model is base
    row, call = ctx.measure(model, case)
    import comfy_harness as harness

    row["call_rel_err_vs_eager"] = round(harness.rel_err(call, ref_call), 5)
    rec[case] = row
    return rec


# --- processes -------------------------------------------------------------------------------------

def child(a) -> int:
    if a.tiny:  # the CPU, as the integration tests boot it
        import comfy_harness

        nodes = comfy_harness.boot(Path(a.comfyui).resolve()).nodes
    else:
        import comfy_dynamic_vram as cdv

        # The writer boots without DynamicVRAM (its builder uses plain torch layers, so either works; this
        # keeps the writer's GPU memory out of the DynamicVRAM allocator of the cases).
        nodes = cdv.boot(a.comfyui, dynamic=not a.no_dynamic and a.child != "write")
    if a.child == "write":
        path = write_model(a.family, a.tiny, Path(a.files))
        Path(a.result).write_text(json.dumps({"path": str(path)}))
        return 0
    profile = Path(a.result).with_suffix(".profile") if a.profile else None
    ctx = Ctx(nodes, a.family, a.tiny, Path(a.files), profile)
    rec = run_case(ctx, a.child)
    Path(a.result).write_text(json.dumps(rec, indent=1))
    return 0


def _node(nodes, node_id, model, **override):
    """Run one of the pack's nodes with its inputs at their defaults (or `override`), as the graph would."""
    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    kwargs = {}
    for name, spec_ in list(cls.INPUT_TYPES()["required"].items())[1:]:
        opts = spec_[1] if len(spec_) > 1 else {}
        kwargs[name] = override.get(name, opts.get("default", spec_[0][0] if isinstance(spec_[0], (list, tuple)) else None))
    return getattr(cls(), cls.FUNCTION)(model, **kwargs)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", required=True, help="the ComfyUI tree (0.33 for DynamicVRAM)")
    p.add_argument("--out", required=True, help="folder for the result files and child logs")
    p.add_argument("--family", default="flux", choices=sorted(FAMILIES))
    p.add_argument("--case", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--work", default="/tmp/sd_accel_dit", help="folder for the generated model file (kept between commands)")
    p.add_argument("--tiny", action="store_true", help="the reduced CPU test model (smoke test of this script, no GPU)")
    p.add_argument("--no-dynamic", action="store_true", help="classic ModelPatcher (as --disable-dynamic-vram)")
    p.add_argument("--profile", action="store_true", help="torch.profiler over steps 4-6 of each row's timed image: "
                   "OUT/<family>_<case>.profile_<row>.txt (op tables) and .trace.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a)
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    write = out / f"{a.family}_write.json"
    flags = (["--tiny"] if a.tiny else []) + (["--no-dynamic"] if a.no_dynamic else []) + (["--profile"] if a.profile else [])
    base = [sys.executable, __file__, "--comfyui", a.comfyui, "--out", a.out, "--family", a.family]
    with open(out / f"{a.family}_write.log", "w") as f:  # its own process: the GPU memory it used goes with it
        rc = subprocess.call(base + ["--child", "write", "--files", str(work), "--result", str(write)] + flags, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        print(f"writing the model failed (rc {rc}); see {out / f'{a.family}_write.log'}")
        return 1
    path = Path(json.loads(write.read_text())["path"])
    print(f"model file {path} ({path.stat().st_size / GB:.1f} GB, {time.perf_counter() - t0:.0f} s)", flush=True)
    for case in a.case.split(","):
        if case == "limit24" and a.tiny:
            continue
        result = out / f"{a.family}_{case}.json"
        log = out / f"{a.family}_{case}.log"
        cmd = base + ["--child", case, "--files", str(path), "--result", str(result)] + flags
        with open(log, "w") as f:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONFAULTHANDLER="1"))
        rec = json.loads(result.read_text()) if rc == 0 and result.is_file() else {"case": case, "crashed": rc, "log": str(log)}
        rows.append(rec)
        print(json.dumps(rec), flush=True)
    return 0 if all("crashed" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
