"""Train a small model of a real ComfyUI family on a procedural image set, for judging step caches.

Random weights mislead step caches (an adaptive cache skips almost every step of a random
DiT), so caches are judged on a model that has learnt something: this script builds the
family's real ComfyUI class at reduced width and depth (`small_dit.SPECS`), trains it with
ComfyUI's own model sampling (flow matching for the DiTs, eps for SD1.5) on seeded shapes,
gradients and textures rendered directly as latents, each class with its own seeded
conditioning embedding (10% of the batch gets the zero "uncond" embedding, so CFG means
something), saves it as safetensors in the layout ComfyUI loads, and loads it back.

    python tests/gpu/train_small_dit.py --comfyui PATH --family flux --out flux_small.safetensors --minutes 3
    python tests/gpu/train_small_dit.py --comfyui PATH --family flux --out /tmp/f.safetensors --smoke   # CPU, seconds

Prints one JSON line: family, steps, final loss (and the loss at the start), the class ComfyUI
gave back and how it was loaded (detection or the supported-model class; see small_dit.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import small_dit  # noqa: E402


NO_BACKWARD = ("this ComfyUI binds comfy-kitchen's RoPE (no backward pass) and has no training switch "
               "(comfy.model_management.in_training): train with ComfyUI 0.33 (or one without comfy-kitchen); "
               "the trained file loads on this one")


def train(args) -> dict:
    small_dit.boot(args.comfyui, cpu=args.smoke or args.cpu)
    import comfy.model_management
    import comfy.model_sampling

    # ComfyUI's own training switch: RoPE etc. take their differentiable paths (comfy-kitchen's have no backward).
    # Hosts without it that bound comfy-kitchen's RoPE at import (0.8.0) cannot train; the file still loads there.
    if not hasattr(comfy.model_management, "in_training"):
        import comfy.ldm.flux.math as fm

        if "kitchen" in str(getattr(fm.apply_rope, "__module__", "")):
            raise SystemExit(NO_BACKWARD)
    comfy.model_management.in_training = True

    dev = torch.device("cuda" if torch.cuda.is_available() and not (args.smoke or args.cpu) else "cpu")
    torch.manual_seed(args.seed)
    base, spec, cfg = small_dit.build(args.family, smoke=args.smoke, seed=args.seed, **dict(args.set))
    base.to(dev).train()
    ms = base.model_sampling
    const = isinstance(ms, comfy.model_sampling.CONST)
    sigmas = ms.sigmas.to(dev).float()
    sigmas = sigmas[sigmas > 1e-3]
    emb = small_dit.class_embeddings(spec).to(dev)
    pooled = small_dit.class_pooled(spec)
    pooled = pooled.to(dev) if pooled is not None else None
    # ComfyUI's blocks add into their activations in place (`img += ...`) after a norm saved them for the
    # backward pass; norms get a copy instead (training only, nothing is patched in the host).
    for mod in base.diffusion_model.modules():
        if "norm" in type(mod).__name__.lower():
            mod.register_forward_pre_hook(lambda _m, a: (a[0].clone(),) + tuple(a[1:]) if a and torch.is_tensor(a[0]) else None)
    params = [p for p in base.diffusion_model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(args.seed + 1)
    amp = dev.type == "cuda"
    budget = args.minutes * 60.0
    t0, step, losses, first = time.perf_counter(), 0, [], None
    extra = {"num_tokens": small_dit.CTX_TOKENS} if args.family == "zimage" else {}
    while step < args.max_steps and (time.perf_counter() - t0) < budget:
        x0, labels = small_dit.sample_batch(spec, args.batch, args.size, g)
        x0 = x0.to(dev)
        drop = torch.rand(len(labels), generator=g) < 0.1
        labels = torch.where(drop, torch.full_like(labels, len(small_dit.CLASSES)), labels).to(dev)
        sigma = sigmas[torch.randint(0, len(sigmas), (len(labels),), generator=g).to(dev)]
        noise = torch.randn(x0.shape, generator=g).to(dev)
        xt = ms.noise_scaling(sigma, noise, x0)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            y = {"y": pooled[labels]} if pooled is not None else {}
            den = base.apply_model(xt, sigma, c_crossattn=emb[labels], **extra, **y)
        sv = sigma.view((-1,) + (1,) * (x0.ndim - 1))
        pred = (xt - den.float()) / sv  # the raw model output (v for flow, eps for SD)
        target = noise - x0 if const else noise
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for grp in opt.param_groups:  # short linear warm-up
            grp["lr"] = args.lr * min(1.0, (step + 1) / 100)
        opt.step()
        losses.append(float(loss.detach()))
        first = first if first is not None else losses[-1]
        step += 1
        if step % 200 == 0:
            print(f"step {step} loss {sum(losses[-200:]) / len(losses[-200:]):.4f} {time.perf_counter() - t0:.0f}s", flush=True)
    comfy.model_management.in_training = False
    base.eval().to("cpu")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tail = losses[-min(50, len(losses)):]
    info = {"steps": step, "loss_first": first, "loss_last": sum(tail) / len(tail), "size": args.size, "seed": args.seed, "smoke": args.smoke}
    small_dit.save(base, args.family, cfg, out, extra={"sdaccel_train": info})
    del base
    m, how = small_dit.load_model(out)  # read it back the way the judge will
    return dict(family=args.family, file=str(out), model=type(m.model).__name__, loaded_by=how,
                seconds=round(time.perf_counter() - t0, 1), device=str(dev), **info)


def _setting(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (VALUE in JSON), found {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"{key}: {value!r} is not JSON (numbers as 3, lists as [16,56,56])") from None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfyui", required=True, help="a ComfyUI source tree")
    ap.add_argument("--family", required=True, choices=list(small_dit.SPECS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=3.0, help="training time budget")
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32, help="latent height = width")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny model, a few steps, CPU (for tests)")
    ap.add_argument("--set", action="append", default=[], type=_setting, metavar="KEY=JSON",
                    help="change one field of the reduced config, e.g. depth_single_blocks=9 (a deeper model's blocks "
                         "weigh as the full model's do in a cached step)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.max_steps, args.batch, args.size = min(args.max_steps, 3), 2, 8
    print(json.dumps(train(args)), flush=True)


if __name__ == "__main__":
    main()
