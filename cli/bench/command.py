"""`sd-accel bench`: its options and what runs them (the measuring is the rest of this package)."""
from __future__ import annotations

import argparse
import os
import sys

from ..args import Help, count, scale


def resolve_host(host: str, comfyui_path: str | None, checkpoint: str | None, pack_dir: str | None = None) -> str:
    """`--host auto`: ComfyUI's own loader and sampler when a ComfyUI tree is known (--comfyui-path,
    $COMFYUI_PATH, or this pack installed in ComfyUI/custom_nodes), else the diffusers UNet."""
    if host != "auto":
        return host
    if checkpoint:  # the ComfyUI host builds its models; a user's file goes through diffusers
        return "diffusers"
    if comfyui_path or os.environ.get("COMFYUI_PATH"):
        return "comfy"
    pack_dir = pack_dir or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # cli/bench/ -> the pack
    root = os.path.dirname(os.path.dirname(pack_dir))  # <ComfyUI>/custom_nodes/<pack>
    if os.path.basename(os.path.dirname(pack_dir)) == "custom_nodes" and os.path.isfile(os.path.join(root, "comfy", "sd.py")):
        os.environ.setdefault("COMFYUI_PATH", root)  # our own process: tells bench.comfy where the tree is
        return "comfy"
    return "diffusers"


def run(args) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ...accel_core.errors import SDAccelError
    from .measure import BenchConfig
    from .run import check_rows, run_bench

    try:
        cfg = BenchConfig(device=args.device, preset=args.preset, steps=args.steps, checkpoint=args.checkpoint,
                          configs=("",) if args.all else (tuple(args.configs) if args.configs is not None else None), out_dir=args.out,
                          seed=args.seed, repeats=args.repeats, threads=args.threads, cfg_scale=args.cfg_scale,
                          host=resolve_host(args.host, args.comfyui_path, args.checkpoint), comfyui_path=args.comfyui_path,
                          dynamic_vram=args.dynamic_vram, dynamo_backend=args.dynamo_backend,
                          wavespeed=args.wavespeed)
        planned = check_rows(cfg)
    except SDAccelError as e:
        print(e, file=sys.stderr)
        return 2
    if cfg.device == "cpu" and (not cfg.preset.endswith("tiny") or cfg.checkpoint):
        what = f"--checkpoint {os.path.basename(cfg.checkpoint)}" if cfg.checkpoint else cfg.preset
        print(f"sd-accel bench: {what} on the CPU is a full-size UNet: expect minutes per row ({len(planned)} rows, each a warm-up "
              f"and {cfg.repeats} timed runs; sdxl-1024 took more than 5 minutes for its first row on 2 cores). Ctrl-C stops it and keeps "
              "the rows already measured; --preset tiny (the CPU default) takes about a minute.", file=sys.stderr)
    bar = tqdm(desc="sd-accel bench", unit="row", total=len(planned), disable=args.no_progress)

    def progress(name):
        bar.set_postfix_str(name[:40])
        bar.update(1)

    try:
        with logging_redirect_tqdm():  # our own log lines go above the bar, not through it
            result = run_bench(cfg, progress=progress)
    except SDAccelError as e:
        bar.close()
        print(e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted; the rows measured so far are in {os.path.join(cfg.out_dir, 'bench.json')} (marked incomplete)", file=sys.stderr)
        return 130
    bar.close()
    from .capture import Caught

    for line in Caught.lines_of(result.warnings):
        print(line, file=sys.stderr)
    print(result.table())
    if result.busy:
        print(f"\nwarning: the machine looks busy ({result.busy_reason}); these numbers are noisy. "
              "Rerun when it is idle, or with more --repeats.", file=sys.stderr)
    if result.failed:
        print(f"\n{len(result.failed)} row(s) failed: {', '.join(result.failed)} (errors in the table and in bench.json)", file=sys.stderr)
    print(f"\nwrote {result.json_path}" + (f" and {result.png_path}" if result.png_path else ""))
    return 1 if result.failed else 0


def add_parser(sub) -> argparse.ArgumentParser:
    from .comfy_presets import PRESETS as COMFY
    from .measure import DEFAULT_REPEATS, DYNAMO_BACKENDS, default_threads
    from .models import PRESETS

    b = sub.add_parser("bench", help="baseline vs each acceleration: ms/step (median, min-max), speed-up, relative error, memory, compile time",
                       formatter_class=Help, description="Times the unaccelerated baseline and each acceleration side by side in one process. "
                       "Each row: one warm-up run, then --repeats timed runs (median and min-max). Writes bench.json and bench.png.")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the UNet runs")
    b.add_argument("--host", default="auto", choices=["auto", "diffusers", "comfy"],
                   help="comfy: ComfyUI's loader, nodes and sampler, with its built-in compile node side by side (needs COMFYUI_PATH, "
                        "--comfyui-path, or this pack inside ComfyUI/custom_nodes); diffusers: a diffusers UNet in our own sampling loop; "
                        "auto: comfy when a ComfyUI tree is known, else diffusers")
    b.add_argument("--comfyui-path", default=None, help="ComfyUI folder for --host comfy (default: $COMFYUI_PATH)")
    dits = [k for k, v in COMFY.items() if v.dit]
    b.add_argument("--preset", default="tiny", choices=list(PRESETS) + dits,
                   help="model and size: tiny (an SD1.5-layout UNet with narrow widths, 128x128: the CPU default), sd15-512, sdxl-1024; "
                        "with --host comfy also the DiT families at full size (--device cuda; seeded random weights written once as a "
                        "safetensors file in the temp folder, 4-41 GB): " + "; ".join(f"{k} ({COMFY[k].what})" for k in dits if not COMFY[k].tiny)
                        + "; and their reduced sizes for the CPU: " + ", ".join(k for k in dits if COMFY[k].tiny))
    b.add_argument("--steps", type=count("the number of sampling steps", "give e.g. --steps 8, or leave it out for the preset's"), default=None,
                   help="sampling steps per run (default: the preset's: " + ", ".join(
                       f"{k} {v.steps}" + (f" ({COMFY[k].steps} with --host comfy)" if k in COMFY and COMFY[k].steps != v.steps else "")
                       for k, v in {**PRESETS, **{k: COMFY[k] for k in dits}}.items()) + ")")
    b.add_argument("--repeats", type=count("the number of timed runs per row", "give e.g. --repeats 5 (1 shows no spread)"), default=DEFAULT_REPEATS,
                   help="timed runs per row after its warm-up run; the row shows their median and min-max")
    b.add_argument("--threads", type=count("the number of CPU threads", "give e.g. --threads 1, or leave it out"), default=None,
                   help=f"torch CPU threads for the whole run, recorded in bench.json (default: half this machine's cores, {default_threads()} here: "
                        "a thread per core stalls whenever another process runs)")
    b.add_argument("--checkpoint", default=None, help="your SD1.x/SDXL .safetensors checkpoint or UNet file (default: seeded random weights)")
    which = b.add_mutually_exclusive_group()
    which.add_argument("--configs", nargs="+", metavar="PREFIX", default=None,
                   help="only rows whose names start with these (the baseline always runs); a prefix that matches no row lists the rows "
                        "(default: the CPU default rows on --device cpu, every row on cuda)")
    which.add_argument("--all", action="store_true", help="every row (the CPU default runs the core and DeepCache rows only)")
    b.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    b.add_argument("--seed", type=count("a seed", "give e.g. --seed 0", 0), default=0, help="seed of the random weights, latent and conditioning")
    b.add_argument("--cfg-scale", type=scale, default=None,
                   help="classifier-free guidance scale (cond and uncond run as one batch of 2; default: the preset's: 7 for SD, "
                        + ", ".join(f"{k} {v.cfg:g}" for k, v in COMFY.items() if v.dit and not v.tiny) + ")")
    b.add_argument("--dynamic-vram", default="auto", choices=["auto", "on", "off"],
                   help="--host comfy on cuda: ComfyUI's DynamicVRAM (comfy-aimdo, ComfyUI >= 0.4); auto: on where ComfyUI's main.py turns "
                        "it on (NVIDIA, torch >= 2.8, comfy-aimdo installed), on: required, off: the classic ModelPatcher")
    b.add_argument("--dynamo-backend", default="inductor", choices=list(DYNAMO_BACKENDS),
                   help="DiT presets: the torch.compile backend of every compile row (ours and ComfyUI's); eager / aot_eager trace and "
                        "guard without generating kernels, a smoke run of the rows in seconds (compile cost and recompiles, not speed)")
    b.add_argument("--wavespeed", default=None, metavar="FOLDER",
                   help="DiT presets: a Comfy-WaveSpeed checkout; adds its First Block Cache, alone and with its Compile Model+, as rows")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(fn=run)
    return b
