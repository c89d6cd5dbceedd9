"""LoRA Hot-Swap on a compiled full-size DiT in ComfyUI with DynamicVRAM, on an NVIDIA GPU.

    python3 tests/gpu/dit_lora_swap.py --comfyui .hosts/ComfyUI-0.33.0 --out $OUT --family flux
    python3 tests/gpu/dit_lora_swap.py --comfyui .hosts/ComfyUI-0.33.0 --out /tmp/o --family flux --tiny   # CPU smoke test

The model file comes from tests/gpu/dit_families.py (seeded random weights of the family's
ComfyUI class, loaded with `comfy.sd.load_diffusion_model`, DynamicVRAM on). Two random LoRAs
(rank --rank, diffusers names for Flux and Qwen-Image so they land in slices of Flux's fused
qkv/linear1, lightx2v-style for Wan) go through SD Accel LoRA Hot-Swap on the model compiled by
SD Accel Compile Model. Recorded (one JSON row, OUT/<family>_lora_swap.json):
  steady_s            a full sampling run with LoRA A, warm
  first_after_swap_s  the first run after switching to LoRA B (target: <= 1.1x steady)
  recompiles          dynamo recompiles and new graphs after the first run (target: 0)
  loraloader_first_s  the same switch with ComfyUI's LoraLoaderModelOnly on the same compiled model, for comparison
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO / "tests" / "gpu"))

FORMAT = {"flux": "diffusers", "qwen_image": "diffusers", "zimage": "kohya", "wan": "lightx2v"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--family", default="flux", choices=("flux", "qwen_image", "zimage", "wan"))
    p.add_argument("--work", default="/tmp/sd_accel_dit")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    if a.tiny:  # CPU: ComfyUI booted as the integration tests boot it
        import comfy_harness

        nodes = comfy_harness.boot(Path(a.comfyui).resolve()).nodes
    else:
        import comfy_dynamic_vram as cdv

        nodes = cdv.boot(a.comfyui, dynamic=True)
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import dit_families as df
    import dit_tiny
    from safetensors.torch import save_file
    from torch._dynamo.utils import counters

    path = df.write_model(a.family, a.tiny, work)
    ctx = df.Ctx(nodes, a.family, a.tiny, path)
    base = ctx.load()
    loras = []
    for name, seed in (("a", 1), ("b", 2)):
        f = work / f"{a.family}{'_tiny' if a.tiny else ''}_lora_{name}_r{a.rank}.safetensors"
        if not f.is_file():
            sd = dit_tiny.make_lora(base, a.family, FORMAT[a.family], seed=seed, rank=a.rank)
            save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(f))
        loras.append(str(f))
    pack = sys.modules[next(n for n in sys.modules if n.endswith("accel_core.hosts.comfy.lora"))]
    compiled = df._node(nodes, "SDAccelCompileUNet", base)
    rec = {"family": a.family, "device": torch.cuda.get_device_name() if ctx.cuda else "cpu", "rank": a.rank,
           "dynamic": bool(getattr(base, "is_dynamic", lambda: False)())}
    with_a = pack.apply_hotswap(compiled, loras[0], 1.0)
    rec["first_s"] = round(ctx.sample(with_a)[1], 2)
    graphs, recompiles = counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())
    rec["steady_s"] = round(min(ctx.sample(with_a)[1] for _ in range(2)), 3)
    with_b = pack.apply_hotswap(compiled, loras[1], 1.0)
    rec["first_after_swap_s"] = round(ctx.sample(with_b)[1], 3)
    rec["steady_b_s"] = round(ctx.sample(with_b)[1], 3)
    rec["ratio_first_after_swap_vs_steady"] = round(rec["first_after_swap_s"] / rec["steady_s"], 3)
    rec["recompiles"] = sum(counters["recompiles"].values()) - recompiles
    rec["new_graphs"] = counters["stats"]["unique_graphs"] - graphs
    state = pack.lora_state(compiled.get_model_object("diffusion_model"))
    rec["fused_weights"] = len(state.signature)
    ll = comfy.sd.load_lora_for_models(compiled, None, comfy.utils.load_torch_file(loras[0], safe_load=True), 1.0, 0)[0]
    rec["loraloader_first_s"] = round(ctx.sample(ll)[1], 3)
    mm.unload_all_models()
    (out / f"{a.family}_lora_swap.json").write_text(json.dumps(rec, indent=1))
    print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
