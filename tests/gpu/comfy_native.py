"""Do ComfyUI's own CUDA graphs act on Flux, and does SD Accel's compile on top capture anything twice?

    python3 tests/gpu/comfy_native.py --comfyui /path/to/ComfyUI-0.33.0 --out OUT [--double 2 --single 4 --size 512]

Boots ComfyUI as its main.py does on NVIDIA with DynamicVRAM on (tests/gpu/comfy_dynamic_vram.py's
boot), writes a Flux.1-dev-width model (hidden 3072, 24 heads; fewer blocks) with seeded random
weights to a safetensors file and loads it with `comfy.sd.load_diffusion_model`. It samples it eager,
then through Compile (inductor, default mode, and reduce-overhead, which captures CUDA graphs of its
own), and counts every CUDA graph capture in the process, split by whether ComfyUI's
`comfy/model_prefetch.py` started it. Per row it records what `native_compile_state` predicted, the
prefetch queues and graph units ComfyUI made, ms/step, and the relative error against eager.
`double_capture` is true when a row has captures both from model_prefetch.py and from Compile. Writes OUT/comfy_native.json and prints it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import comfy_dynamic_vram as cdv  # noqa: E402  (boot, as main.py does)

CAPTURES = {"model_prefetch": 0, "other": 0}
FLUX_DEV = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                num_heads=24, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])


def count_captures():
    """Count torch.cuda.CUDAGraph captures, by who asked (this script's process only)."""
    orig = torch.cuda.CUDAGraph.capture_begin
    marker = os.path.join("comfy", "model_prefetch.py")

    def counted(self, *a, **k):
        native = any(f.filename.endswith(marker) for f in traceback.extract_stack()[:-1])
        CAPTURES["model_prefetch" if native else "other"] += 1
        return orig(self, *a, **k)

    torch.cuda.CUDAGraph.capture_begin = counted


def write_flux(path: Path, double: int, single: int):
    import comfy.ldm.flux.model as flux
    import comfy.ops

    fields = {f.name for f in dataclasses.fields(flux.FluxParams)}
    params = {k: v for k, v in dict(FLUX_DEV, depth=double, depth_single_blocks=single).items() if k in fields}
    torch.manual_seed(0)
    model = flux.Flux(image_model="flux", dtype=torch.bfloat16, device="cpu", operations=comfy.ops.disable_weight_init, **params)
    sd = {}
    for name, t in model.state_dict().items():
        fan_in = t.shape[-1] if t.dim() > 1 else 1
        sd[name] = (torch.randn(t.shape) / fan_in ** 0.5 if t.dim() > 1 else torch.zeros(t.shape)).to(torch.bfloat16)
        if name.endswith("scale"):  # RMSNorm scales
            sd[name] = torch.ones(t.shape, dtype=torch.bfloat16)
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return sum(t.numel() for t in sd.values())


def pack_module(dotted: str):
    for name, mod in sys.modules.items():
        if name.endswith(dotted) and name != dotted:
            return mod
    raise RuntimeError(f"SD Accel's {dotted} is not loaded")


def run(nodes, model, size: int, steps: int):
    import comfy.model_prefetch as mp

    g = torch.Generator().manual_seed(1)
    cond = torch.randn(1, 256, 4096, generator=g)
    pos = [[cond, {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    neg = [[torch.zeros_like(cond), {"pooled_output": torch.zeros(1, 768), "guidance": 3.5}]]
    latent = {"samples": torch.zeros(1, 16, size // 8, size // 8)}
    before = dict(CAPTURES)
    times = []
    for _ in range(3):  # first run (compile, warm-up), then two timed runs
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = nodes.common_ksampler(model, 42, steps, 1.0, "euler", "simple", pos, neg, latent)[0]["samples"].clone()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        units, queues = len(mp.GRAPH_MODULES), len(mp.PREFETCH_QUEUES)  # before ComfyUI's per-node cleanup
        mp.cleanup_prefetch_queues()  # what execution.py does after each node
    row = {"first_s": round(times[0], 2), "ms_per_step": round(1000 * min(times[1:]) / steps, 2),
           "captures_by_model_prefetch": CAPTURES["model_prefetch"] - before["model_prefetch"],
           "captures_other": CAPTURES["other"] - before["other"], "comfy_graph_units": units, "comfy_prefetch_queues": queues}
    return out, row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args(argv)
    nodes = cdv.boot(a.comfyui, dynamic=True)
    count_captures()
    import comfy.sd

    native = pack_module("accel_core.hosts.comfy.native")
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flux_reduced.safetensors"
        result["params"] = write_flux(path, a.double, a.single)
        base = comfy.sd.load_diffusion_model(str(path))
        result["dynamic"] = bool(getattr(base, "is_dynamic", lambda: False)())
        result["predicted"] = native.native_compile_state(base).to_dict()
        ref, result["rows"]["eager"] = run(nodes, base, a.size, a.steps)
        compile_node = nodes.NODE_CLASS_MAPPINGS["SDAccelCompileUNet"]()
        for mode in ("default", "reduce-overhead"):
            name = f"compile {mode}"
            try:
                m = getattr(compile_node, compile_node.FUNCTION)(base, "inductor", mode, False, False)[0]
                out, row = run(nodes, m, a.size, a.steps)
                row.update(passed_through=m is base, predicted=native.native_compile_state(m).to_dict(),
                           rel_err=round(float((out - ref).norm() / ref.norm().clamp_min(1e-12)), 5))
                report = pack_module("accel_core.hosts.comfy").compile_report(m)
                row["compile_status"] = report and report.get("status")
            except Exception as e:  # a row that fails is a result too
                row = {"error": f"{type(e).__name__}: {e}"}
            result["rows"][name] = row
    rows = result["rows"]
    result["comfy_graphs_on_flux"] = rows["eager"]["captures_by_model_prefetch"] > 0
    result["double_capture"] = any(r.get("captures_by_model_prefetch", 0) and r.get("captures_other", 0) for r in rows.values())
    (out_dir / "comfy_native.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
