"""Wan 2.2's two-model split on an NVIDIA GPU in ComfyUI with DynamicVRAM, one process per case.

    python3 tests/gpu/wan22_split.py --comfyui .hosts/ComfyUI-0.33.0 --out $OUT --case eager,ours,ours_separate,ours_cache
    python3 tests/gpu/wan22_split.py --comfyui .hosts/ComfyUI-0.33.0 --out /tmp/o --tiny   # CPU smoke test

Wan 2.2 14B is a high-noise and a low-noise model sampled by two KSamplerAdvanced nodes (steps
0..N/2 returning the leftover noise, then N/2..N with add_noise off). Two 14B files are 2 x 28 GB;
this script uses two models of the bench's Wan architecture (`wan-480p`: the 5B class, 832x480, 33
frames; seeds 0 and 1, ~10 GB each in bf16) as the pair, loaded with `comfy.sd.load_diffusion_model`.
Each case records: the first split run's seconds (compile included), ms/step (best of 2 steady
runs), dynamo graphs and recompiles, peak GPU memory, the final latent's rel err against eager.

  eager          ComfyUI as loaded, both models
  ours           Compile Model on both (node defaults; blocks without CUDA graphs): the low-noise model runs the
                 high-noise model's compiled block (same structure: accel_core/regional.py)
  ours_separate  the same with one compiled callable per model (what sharing saves: first-run seconds,
                 graphs, memory)
  ours_cache     Compile Model + Step Cache (fixed, interval 3) on both: each stage its own run

Results: OUT/wan22_<case>.json and one JSON line per case on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dit_families as df  # noqa: E402  (its helpers: the bench's Wan spec and builder, boot, _node)

CASES = ("eager", "ours", "ours_separate", "ours_cache")
GB = 1024 ** 3


def write(tiny: bool, work: Path) -> list[Path]:
    import comfy.utils

    dit, _ = df._package()
    paths = []
    for seed, name in ((0, "high"), (1, "low")):
        path = work / f"wan22_{name}{'_tiny' if tiny else ''}.safetensors"
        if not path.is_file():
            dev = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
            comfy.utils.save_torch_file(dit.build_weights("wan", tiny, seed, dev), str(path.with_suffix(".part")))
            path.with_suffix(".part").rename(path)
        paths.append(path)
    return paths


def load(path: Path, tiny: bool):
    """The model as Load Diffusion Model loads it (--tiny: detection cannot read the 64-wide test model's heads; built from its config)."""
    import comfy.sd
    import comfy.utils

    if not tiny:
        return comfy.sd.load_diffusion_model(str(path))
    import dit_models

    m = dit_models.build("wan")
    m.model.diffusion_model.load_state_dict(comfy.utils.load_torch_file(str(path)))
    return m


def split(nodes, ctx, high, low, steps):
    pos, neg, latent = ctx.inputs()
    ks, half = nodes.KSamplerAdvanced(), steps // 2
    ctx.sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        mid = ks.sample(high, "enable", 42, steps, ctx.spec["cfg"], "euler", "simple", pos, neg, latent, 0, half, "enable")[0]
        out = ks.sample(low, "disable", 42, steps, ctx.spec["cfg"], "euler", "simple", pos, neg, mid, half, 10000, "disable")[0]
    ctx.sync()
    return out["samples"].float().clone(), time.perf_counter() - t0


def run_case(nodes, ctx, paths, case: str) -> dict:
    from torch._dynamo.utils import counters

    high, low = (load(p, ctx.tiny) for p in paths)
    steps = ctx.spec["steps"]
    rec = {"case": case, "device": torch.cuda.get_device_name() if ctx.cuda else "cpu", "torch": torch.__version__, "steps": steps,
           "dynamic": bool(getattr(high, "is_dynamic", lambda: False)())}
    ref, _ = split(nodes, ctx, high, low, steps)
    if case != "eager":
        if case == "ours_separate":
            regional = sys.modules[nodes.NODE_CLASS_MAPPINGS["SDAccelCompileUNet"].__module__.rsplit(".nodes.", 1)[0] + ".accel_core.regional"]
            regional.RegionalCompiled._shared = lambda self, kind: self.backend.compile(regional._runner(f"sep_{id(self)}"), None, self.config)
        high, low = (df._node(nodes, "SDAccelCompileUNet", m) for m in (high, low))
        if case == "ours_cache":
            high, low = (df._node(nodes, "SDAccelStepCache", m, mode="fixed", interval=3) for m in (high, low))
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    g0 = counters["stats"]["unique_graphs"]
    out, first = split(nodes, ctx, high, low, steps)
    times = [split(nodes, ctx, high, low, steps)[1] for _ in range(2)]
    rec.update(first_run_s=round(first, 2), ms_per_step=round(1000 * min(times) / steps, 2), graphs=counters["stats"]["unique_graphs"] - g0,
               recompiles=sum(counters["recompiles"].values()), final_rel_err_vs_eager=round(float((out - ref).norm() / ref.norm()), 5))
    if ctx.cuda:
        rec["peak_alloc_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--case", default=",".join(CASES))
    p.add_argument("--work", default="/tmp/sd_accel_dit")
    p.add_argument("--tiny", action="store_true", help="the reduced CPU model (smoke test of this script, no GPU)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    out, work = Path(a.out), Path(a.work)
    if a.child:
        if a.tiny:
            import comfy_harness

            nodes = comfy_harness.boot(Path(a.comfyui).resolve()).nodes
        else:
            import comfy_dynamic_vram as cdv

            nodes = cdv.boot(a.comfyui, dynamic=a.child != "write")
        paths = write(a.tiny, work)
        if a.child != "write":
            ctx = df.Ctx(nodes, "wan", a.tiny, paths[0])
            (out / f"wan22_{a.child}.json").write_text(json.dumps(run_case(nodes, ctx, paths, a.child), indent=1))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, __file__, "--comfyui", a.comfyui, "--out", a.out, "--work", a.work] + (["--tiny"] if a.tiny else [])
    ok = True
    for case in ["write"] + a.case.split(","):
        with open(out / f"wan22_{case}.log", "w") as f:  # one process per case: a crash ends only that row
            rc = subprocess.call(base + ["--child", case], stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONFAULTHANDLER="1"))
        if case == "write":
            if rc:
                print(f"writing the models failed (rc {rc}); see {out / 'wan22_write.log'}")
                return 1
            continue
        result = out / f"wan22_{case}.json"
        rec = json.loads(result.read_text()) if rc == 0 and result.is_file() else {"case": case, "crashed": rc}
        ok &= "crashed" not in rec
        print(json.dumps(rec), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
