"""GPU measurement of the webui path (not a test; run it by hand, see docs/webui.md "Measured"): A1111's own ldm UNetModel (SD1.5 layout, stable-diffusion-stability-ai
at the commit webui 1.10 pins), fp16 weights + CUDA autocast as A1111 runs it, the SDP attention A1111's
"sdp" optimization installs, 20 Euler steps with CFG (batch 2), 512x512 (64x64 latent).

Rows, each against the eager run in the same process: SD Accel's A1111 path (A1111Patch.apply:
the scoped forward swap) with compile, DeepCache, and both. Random weights (seeded).
"""
import importlib.util
import json
import os
import sys
import time
import types

import torch
import torch.nn.functional as F

REPO = os.environ.get("REPO", os.getcwd())
# The folder holding A1111's `ldm` package (a webui's repositories/stable-diffusion-stability-ai).
LDM = os.environ.get("LDM_PATH") or os.path.join(os.environ.get("WEBUI_A1111_PATH", ""), "repositories", "stable-diffusion-stability-ai")
sys.path.insert(0, LDM)
# ldm's UNetModel.__init__ checks isinstance against omegaconf's ListConfig only; omegaconf is not on the GPU machine.
om, oml = types.ModuleType("omegaconf"), types.ModuleType("omegaconf.listconfig")
oml.ListConfig = type("ListConfig", (list,), {})
om.listconfig = oml
sys.modules.setdefault("omegaconf", om)
sys.modules.setdefault("omegaconf.listconfig", oml)

spec = importlib.util.spec_from_file_location("sd_accel", os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO])
pkg = importlib.util.module_from_spec(spec)
sys.modules["sd_accel"] = pkg
spec.loader.exec_module(pkg)
from sd_accel.accel_core.hosts import webui as W  # noqa: E402

from ldm.modules import attention as ldm_attention  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402


def sdp_forward(self, x, context=None, mask=None, **kwargs):
    # What A1111's "sdp" cross-attention optimization does (modules/sd_hijack_optimizations.py), minus hypernetworks.
    h = self.heads
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b, n, inner = q.shape
    q, k, v = (t.view(b, -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(b, -1, inner).to(q.dtype)
    return self.to_out(out)


ldm_attention.CrossAttention.forward = sdp_forward

STEPS, CFG, DEV = int(os.environ.get("STEPS", 20)), 7.0, os.environ.get("DEV", "cuda")
SMALL = bool(os.environ.get("SMALL"))  # a quick CPU check of the script itself
torch.manual_seed(0)
unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=32 if SMALL else 320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
                 channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True, transformer_depth=1, context_dim=768,
                 use_checkpoint=False, legacy=False)
with torch.no_grad():
    for p in unet.parameters():
        if not p.any():
            p.normal_(0, 0.02)  # zero-initialised convs would make the output 0
DT = torch.float16 if DEV == "cuda" else torch.float32
unet = unet.to(DEV, DT).eval()
unet.dtype = DT  # what A1111's loader sets for fp16

g = torch.Generator().manual_seed(1)
latent0 = torch.randn(1, 4, 16 if SMALL else 64, 16 if SMALL else 64, generator=g).to(DEV)
ctx = (torch.randn(2, 77, 768, generator=g) * 0.5).to(DEV, DT)
betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
alphas = torch.cumprod(1 - betas, 0)
all_sigmas = ((1 - alphas) / alphas) ** 0.5
ts = torch.linspace(999, 0, STEPS).round().long()
sigmas = torch.cat([all_sigmas[ts], torch.zeros(1, dtype=torch.float64)]).float()


class Denoiser:  # the counter A1111's CFGDenoiser keeps (step / total_steps)
    step, total = 0, STEPS


den = Denoiser()


def sample():
    x = latent0 * sigmas[0]
    with torch.no_grad(), torch.autocast(DEV, dtype=DT, enabled=DEV == "cuda"):  # devices.autocast()
        for i in range(STEPS):
            den.step = i
            s = sigmas[i]
            xin = (x / (s ** 2 + 1) ** 0.5).expand(2, -1, -1, -1)
            eps = unet(xin, ts[i].to(DEV).expand(2), ctx).float()  # DiffusionWrapper: diffusion_model(x, t, context=cc)
            e_c, e_u = eps.chunk(2)
            x = x + (e_u + CFG * (e_c - e_u)) * (sigmas[i + 1] - s)
    return x


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(label, opts):
    sd = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet))
    applied = W.A1111.apply(sd, opts, progress=lambda: (den.step, den.total)) if opts is not None else None
    sync()
    t0 = time.perf_counter()
    out = sample()
    sync()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(1 if SMALL else 3):
        sync()
        t0 = time.perf_counter()
        out = sample()
        sync()
        best = min(best, time.perf_counter() - t0)
    W.A1111.undo()
    assert "forward" not in unet.__dict__
    rep = applied.compile_report.to_dict() if applied is not None and applied.compile_report is not None else None
    return {"name": label, "s_per_image": best, "ms_per_step": best / STEPS * 1000, "first_run_s": first, "compile": rep and rep["status"]}, out


rows, ref = [], None
cases = [
    ("A1111 eager fp16 (baseline)", None),
    ("SD Accel compile inductor default", W.WebuiOptions(enabled=True, backend="inductor")),
    ("SD Accel DeepCache interval 3 depth 1", W.WebuiOptions(enabled=True, deepcache_interval=3, deepcache_depth=1)),
    ("SD Accel compile + DeepCache 3/1", W.WebuiOptions(enabled=True, backend="inductor", deepcache_interval=3, deepcache_depth=1)),
    ("SD Accel compile reduce-overhead", W.WebuiOptions(enabled=True, backend="inductor", mode="reduce-overhead")),
    ("SD Accel compile r-o + DeepCache 3/1", W.WebuiOptions(enabled=True, backend="inductor", mode="reduce-overhead", deepcache_interval=3, deepcache_depth=1)),
]
for label, opts in cases:
    row, out = timed(label, opts)
    if ref is None:
        ref, base = out, row["s_per_image"]
    row["speedup"] = base / row["s_per_image"]
    row["rel_err"] = float((out - ref).norm() / ref.norm())
    rows.append(row)
    print(json.dumps(row), flush=True)
dev = torch.cuda.get_device_name() if DEV == "cuda" else "CPU"
print(f"\n{dev}, torch {torch.__version__}, SD1.5 ldm UNetModel (A1111){' (SMALL)' if SMALL else ''}, 512x512, {STEPS} Euler steps, CFG batch 2, fp16")
for r in rows:
    print(f"{r['name']:<42} {r['ms_per_step']:8.2f} ms/step {r['speedup']:6.2f}x  rel err {r['rel_err']:.4f}  first run {r['first_run_s']:.1f}s  {r['compile'] or ''}")
out_dir = os.environ.get("OUT", ".")
with open(os.path.join(out_dir, "webui_unet_bench.json"), "w") as f:
    json.dump({"device": dev, "torch": torch.__version__, "steps": STEPS, "rows": rows}, f, indent=2)
