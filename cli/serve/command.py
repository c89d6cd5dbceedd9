"""`sd-accel serve`: its options, the checks made before Ray starts, start-up progress and a clean stop
(the replicas are `deployment`, their work `pipeline`)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..args import Help, count, scale


def _serve_checks(args, cfg) -> str | None:
    """What `serve` refuses before Ray starts (devices, port, checkpoint), as the message; None when fine."""
    import socket

    if args.device == "cuda" and not args.address:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            return ("sd-accel serve: --device cuda was asked for, but torch sees no CUDA device. Run with --device cpu, or on a machine "
                    "with an NVIDIA GPU and a CUDA build of torch (or give --address of a Ray cluster with GPUs).")
        if args.replicas > n:
            return (f"sd-accel serve: --replicas {args.replicas} with --device cuda needs one GPU each, found {n} GPU(s) here. "
                    f"Give --replicas {n} or fewer, or --address of a Ray cluster with more GPUs.")
    if args.checkpoint:
        from ..bench.models import check_checkpoint

        check_checkpoint(args.checkpoint)
    if not args.address or args.listen in ("127.0.0.1", "localhost", "0.0.0.0"):
        try:
            with socket.socket(socket.AF_INET6 if ":" in args.listen else socket.AF_INET) as sock:
                sock.bind((args.listen, args.port))
        except OSError as e:
            return (f"sd-accel serve: cannot listen on {args.listen}:{args.port} ({e.strerror or e}); expected a free port on an address "
                    "of this machine. Give another --port (or stop what uses it), or another --listen.")
    return None


def run(args) -> int:
    """Start `--replicas` Ray Serve replicas and serve until Ctrl-C or SIGTERM."""
    import shutil
    import signal
    import tempfile
    import time

    from ...accel_core.errors import SDAccelError

    try:
        from . import deployment as sd_serve
        from .pipeline import ServeConfig

        sd_serve.require_ray()
        cfg = ServeConfig(preset=args.preset, checkpoint=args.checkpoint, device=args.device, compile=not args.no_compile, mode=args.mode,
                          max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait, max_steps=args.max_steps, lora_dir=args.lora_dir,
                          cache_dir=os.path.abspath(args.cache_dir) if args.cache_dir else None, threads=args.threads,
                          warm_deepcache=tuple(d for d in args.warm_deepcache if d))
        refused = _serve_checks(args, cfg)
    except (SDAccelError, ImportError) as e:
        refused = str(e)
    if refused:
        print(refused, file=sys.stderr)
        return 2
    data = None
    if args.artifacts:
        from ...accel_core import cache_artifacts as ca

        try:
            with open(args.artifacts, "rb") as f:
                data = f.read()
            print(f"artifacts {args.artifacts}: {ca.read_bundle(data, args.artifacts).describe()}")
        except OSError as e:
            print(f"sd-accel serve: cannot read --artifacts {args.artifacts!r} ({e.strerror or e}); starting without it (the replicas compile as usual).",
                  file=sys.stderr)
            data = None
        except ca.ArtifactsError as e:
            print(f"{e}\nstarting without it.", file=sys.stderr)
            data = None

    class Stop(Exception):
        pass

    def on_term(signum, frame):
        raise Stop()

    def say(line):
        print(f"[{time.perf_counter() - t0:6.1f} s] {line}", flush=True)

    import ray

    work = None if args.address else tempfile.mkdtemp(prefix="sd-accel-serve-")  # the replicas' temp folders, removed at exit
    if work:
        from dataclasses import replace

        cfg = replace(cfg, work_dir=work)
    old_term = signal.signal(signal.SIGTERM, on_term)
    t0 = time.perf_counter()
    code = 0
    try:
        say(f"starting {'a local Ray cluster' if not args.address else 'on the Ray cluster at ' + args.address}")
        # log_to_driver=False: the replicas' start-up comes as progress lines, not as Ray's log stream.
        ray.init(address=args.address, namespace=sd_serve.NAMESPACE, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        signal.signal(signal.SIGTERM, on_term)  # again: Ray's core put its own (a stack dump, then death) in place of ours
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        say(f"starting {args.replicas} replica(s) on {args.device}: each loads the model, the first compiles "
            f"{'(minutes on a CPU)' if args.device == 'cpu' and not args.no_compile else ''}".rstrip())
        sd_serve.start(cfg, args.replicas, data, args.artifacts or "", port=args.port, host=args.listen, progress=say)
        say(f"serving {args.replicas} replica(s) at http://{args.listen}:{args.port}/ (POST / with JSON, GET /info), "
            f"warm after {time.perf_counter() - t0:.1f} s; artifacts: {sd_serve.store_status()}")
        print("Ctrl-C (or SIGTERM) stops it.", flush=True)
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, Stop):
        print("\nstopping...", file=sys.stderr, flush=True)
    except SDAccelError as e:
        print(e, file=sys.stderr)
        code = 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if ray.is_initialized():
                sd_serve.stop()
        except Exception as e:  # noqa: BLE001 - stopping goes on; Ray itself goes below
            print(f"sd-accel serve: stopping the replicas: {type(e).__name__}: {e}", file=sys.stderr)
        ray.shutdown()
        if work:
            shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, old_term)
    if code == 0:
        print("stopped.", file=sys.stderr)
    return code


def deepcache_setting(text: str):
    """argparse type for --warm-deepcache: INTERVAL:DEPTH, or none."""
    if text.lower() == "none":
        return None
    try:
        interval, depth = (int(v) for v in text.split(":"))
    except ValueError:
        interval = depth = -1
    if interval < 2 or not 0 <= depth <= 11:
        raise argparse.ArgumentTypeError(f"expects INTERVAL:DEPTH (interval 2 or more, depth 0 to 11) or none, found {text!r}; give e.g. 3:0")
    return interval, depth


def add_parser(sub) -> argparse.ArgumentParser:
    from ...accel_core.compiling import CompileConfig
    from ...accel_core.options import cli_argument

    v = sub.add_parser("serve", help="serve SD sampling over HTTP with N Ray Serve replicas (one GPU each), warm from one compile",
                       formatter_class=Help, description="Starts a Ray Serve deployment of a diffusers UNet sampling pipeline (the embedded "
                       "default model or --checkpoint). The first replica compiles and publishes its compile artifacts; the others import "
                       "them. Requests choose seed, steps, cfg, side, DeepCache and LoRAs. Needs ray[serve]. See docs/fleet.md.")
    v.add_argument("--replicas", type=count("the number of replicas", "give e.g. --replicas 2"), default=1, help="replicas (one GPU each with --device cuda)")
    v.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where each replica runs its UNet")
    v.add_argument("--preset", default="tiny", choices=["tiny", "sd15-512", "sdxl-1024", "micro"],
                   help="embedded model, default size and steps: tiny (an SD1.5-layout UNet with narrow widths, 128x128), sd15-512, sdxl-1024, "
                        "or micro (a UNet of a few kB, 64x64, 4 steps: compiles in seconds, for trying the serving set-up)")
    v.add_argument("--checkpoint", default=None, help="your SD1.x/SDXL .safetensors checkpoint or UNet file (default: seeded random weights)")
    v.add_argument("--artifacts", default=None, help="an artifacts file from `sd-accel cache export` to start every replica warm")
    v.add_argument("--cache-dir", default=None, help="a folder all replicas share for the compile artifacts (default: Ray's object store)")
    v.add_argument("--lora-dir", default=None, help="folder of .safetensors LoRAs requests may name")
    v.add_argument("--no-compile", action="store_true", help="eager UNet (DeepCache and LoRAs still apply)")
    cli_argument(v, CompileConfig, "mode")  # choices, default and help declared on CompileConfig
    v.add_argument("--max-batch-size", type=count("the largest batch", "give e.g. --max-batch-size 4"), default=4,
                   help="requests batched into one UNet call (padded to a power of two)")
    v.add_argument("--batch-wait", type=scale, default=0.05, help="seconds a replica waits to fill a batch")
    v.add_argument("--max-steps", type=count("the most steps a request may ask for", "give e.g. --max-steps 50"), default=50,
                   help="requests asking for more are refused")
    v.add_argument("--threads", type=count("the number of CPU threads", "give e.g. --threads 1, or leave it out"), default=None,
                   help="torch CPU threads per replica (default: torch's)")
    v.add_argument("--warm-deepcache", nargs="+", type=deepcache_setting, default=[(3, 0)], metavar="INTERVAL:DEPTH",
                   help="DeepCache settings compiled at start, so requests with them are served warm (others compile on first use); none: no "
                        "DeepCache warm-up (default: 3:0, a request's {\"deepcache\": {\"interval\": 3}})")
    v.add_argument("--port", type=count("a TCP port", "give e.g. --port 8000", 1, 65535), default=8000, help="HTTP port")
    v.add_argument("--listen", default="127.0.0.1", help="HTTP address (0.0.0.0 for every interface)")
    v.add_argument("--address", default=None, help="a running Ray cluster (default: start a local one)")
    v.set_defaults(fn=run)
    return v
