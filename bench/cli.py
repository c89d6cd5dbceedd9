"""`sd-accel` console script: `sd-accel bench ...`, `sd-accel backends`, `sd-accel cache`."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def resolve_host(host: str, comfyui_path: str | None, checkpoint: str | None, pack_dir: str | None = None) -> str:
    """`--host auto`: ComfyUI's own loader and sampler when a ComfyUI tree is known (--comfyui-path,
    $COMFYUI_PATH, or this pack installed in ComfyUI/custom_nodes), else the diffusers UNet."""
    if host != "auto":
        return host
    if checkpoint:  # the ComfyUI host builds its models; a user's file goes through diffusers
        return "diffusers"
    if comfyui_path or os.environ.get("COMFYUI_PATH"):
        return "comfy"
    pack_dir = pack_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = os.path.dirname(os.path.dirname(pack_dir))  # <ComfyUI>/custom_nodes/<pack>
    if os.path.basename(os.path.dirname(pack_dir)) == "custom_nodes" and os.path.isfile(os.path.join(root, "comfy", "sd.py")):
        os.environ.setdefault("COMFYUI_PATH", root)  # our own process: tells bench.comfy where the tree is
        return "comfy"
    return "diffusers"


def _bench(args) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ..accel_core.errors import SDAccelError
    from .measure import BenchConfig
    from .run import check_rows, run_bench

    try:
        cfg = BenchConfig(device=args.device, preset=args.preset, steps=args.steps, checkpoint=args.checkpoint,
                          configs=("",) if args.all else (tuple(args.configs) if args.configs is not None else None), out_dir=args.out,
                          seed=args.seed, repeats=args.repeats, threads=args.threads, cfg_scale=args.cfg_scale,
                          host=resolve_host(args.host, args.comfyui_path, args.checkpoint), comfyui_path=args.comfyui_path)
        planned = check_rows(cfg)
    except SDAccelError as e:
        print(e, file=sys.stderr)
        return 2
    if cfg.device == "cpu" and (cfg.preset != "tiny" or cfg.checkpoint):
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


def _backends(args) -> int:
    import torch

    from ..accel_core.backends import BACKENDS
    from ..accel_core.optional import INSTALL_HINTS

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for name, b in BACKENDS.items():
        ok = b.available(dev)
        missing = "" if ok else b.missing(dev)
        hint = INSTALL_HINTS.get(missing, "")
        print(f"{name:<12} {'available' if ok else 'missing: ' + missing + (' (' + hint + ')' if hint else '')}")
    return 0


def _cache_folder(args) -> tuple[str | None, str | None]:
    """(the cache folder `sd-accel cache` works on, None) or (None, the message refusing the options)."""
    from ..accel_core import compile_cache as cc

    if args.comfyui_path and not os.path.isdir(os.path.join(args.comfyui_path, "comfy")):
        return None, (f"sd-accel cache: --comfyui-path {args.comfyui_path!r} is not a ComfyUI folder (expected comfy/ inside it). "
                      "Give the ComfyUI folder, or --dir with the cache folder itself.")
    if args.webui_path and not os.path.isdir(os.path.join(args.webui_path, "modules")):
        return None, (f"sd-accel cache: --webui-path {args.webui_path!r} is not a stable-diffusion-webui / Forge folder (expected modules/ "
                      "inside it). Give the webui folder, or --dir with the cache folder itself.")
    if args.dir and os.path.exists(args.dir) and not os.path.isdir(args.dir):
        return None, (f"sd-accel cache: --dir {args.dir!r} is a file; expected the compile-cache folder. Give the folder "
                      f"(default: ${cc.ENV}, else ~/.cache/sd_accel/compile_cache).")
    if args.dir:
        return os.path.abspath(args.dir), None
    if os.environ.get(cc.ENV, "").strip():
        return cc.default_cache_dir(None), None  # None: switched off
    if args.webui_path:  # the webui's cache folder, as modules/cache.py picks it
        base = os.environ.get("SD_WEBUI_CACHE_DIR") or os.path.join(os.path.abspath(args.webui_path), "cache")
        return os.path.join(os.path.abspath(base), cc.SUBDIR), None
    root = args.comfyui_path or os.environ.get("COMFYUI_PATH")
    if root:
        return os.path.join(os.path.abspath(root), "user", cc.SUBDIR), None  # ComfyUI's default user directory
    return cc.default_cache_dir(None), None


def _cache(args) -> int:
    """List, --clear, export or import the on-disk compile cache of a host."""
    from ..accel_core import compile_cache as cc

    if args.action in ("export", "import") and not args.file:
        print(f"sd-accel cache {args.action}: expected the artifacts FILE to {'write' if args.action == 'export' else 'read'}, found none. "
              f"Give it, e.g. `sd-accel cache {args.action} unet.sdca`.", file=sys.stderr)
        return 2
    if args.action == "list" and args.file:
        print(f"sd-accel cache: found {args.file!r} after the folder options; expected `export FILE` or `import FILE` before it. "
              "Give the verb, e.g. `sd-accel cache export FILE`.", file=sys.stderr)
        return 2
    if args.clear and args.action != "list":
        print(f"sd-accel cache {args.action}: --clear only goes with listing; expected `sd-accel cache --clear` alone. Run them one after the other.",
              file=sys.stderr)
        return 2
    folder, refused = _cache_folder(args)
    if refused:
        print(refused, file=sys.stderr)
        return 2
    if folder is None:
        print(f"the compile cache is switched off (${cc.ENV}={os.environ[cc.ENV]})" +
              ("; give --dir to pick a folder anyway" if args.action != "list" else ""), file=sys.stderr if args.action != "list" else sys.stdout)
        return 0 if args.action == "list" else 2
    if args.action == "export":
        return _cache_export(folder, args)
    if args.action == "import":
        return _cache_import(folder, args)
    if not os.path.isdir(folder):
        print(f"{folder}: does not exist yet (nothing compiled there so far)")
        return 0
    files = cc.entries(folder)
    if args.clear:
        print(f"removed {cc.clear(folder)} files from {folder}")
        return 0
    total = sum(e.size for e in files)
    print(f"{folder}: {len(files)} files, {total / 2 ** 20:.1f} MB")
    for e in files:
        fp = (e.header or {}).get("fingerprint", {})
        what = f"{len(e.keys)} artifacts, torch {fp.get('torch')}, {fp.get('device')}" if e.header else "unreadable"
        if e.header and e.header.get("compile"):
            what += ", " + " ".join(f"{k}={v}" for k, v in e.header["compile"].items())
        print(f"  {os.path.basename(e.path)}  {e.size / 2 ** 20:.1f} MB  {what}")
    return 0


def _cache_export(folder: str, args) -> int:
    from ..accel_core import cache_artifacts as ca

    if os.path.isdir(args.file):
        print(f"sd-accel cache export: {args.file!r} is a folder; expected the artifacts file to write. Give a file name, e.g. {os.path.join(args.file, 'unet.sdca')}.",
              file=sys.stderr)
        return 2
    try:
        data = ca.export_bundle(folder, args.fingerprint)
        bundle = ca.read_bundle(data)
        ca.write_bundle(args.file, data)
    except ca.ArtifactsError as e:
        print(e, file=sys.stderr)
        return 2
    except OSError as e:
        print(f"sd-accel cache export: could not write {args.file!r} ({e}); expected a writable file path. Give another path.", file=sys.stderr)
        return 2
    print(f"wrote {args.file}: {bundle.describe()}")
    return 0


def _cache_import(folder: str, args) -> int:
    from ..accel_core import cache_artifacts as ca

    try:
        with open(args.file, "rb") as f:
            data = f.read()
    except OSError as e:
        print(f"sd-accel cache import: cannot read {args.file!r} ({e.strerror or e}); expected an artifacts file from `sd-accel cache export`. "
              "Check the path.", file=sys.stderr)
        return 2
    try:
        res = ca.import_bundle(data, folder, args.device, source=args.file)
    except ca.ArtifactsError as e:
        print(e, file=sys.stderr)
        return 2
    except OSError as e:
        print(f"sd-accel cache import: could not write into {folder} ({e}); expected a writable cache folder. Give another with --dir.", file=sys.stderr)
        return 2
    print(f"{res.describe()}; the next compiled run there loads them")
    return 0


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
        from .models import check_checkpoint

        check_checkpoint(args.checkpoint)
    if not args.address or args.listen in ("127.0.0.1", "localhost", "0.0.0.0"):
        try:
            with socket.socket(socket.AF_INET6 if ":" in args.listen else socket.AF_INET) as sock:
                sock.bind((args.listen, args.port))
        except OSError as e:
            return (f"sd-accel serve: cannot listen on {args.listen}:{args.port} ({e.strerror or e}); expected a free port on an address "
                    "of this machine. Give another --port (or stop what uses it), or another --listen.")
    return None


def _serve(args) -> int:
    """Start `--replicas` Ray Serve replicas and serve until Ctrl-C or SIGTERM."""
    import shutil
    import signal
    import tempfile
    import time

    from ..accel_core.errors import SDAccelError

    try:
        from . import serve as sd_serve
        from .serve_pipeline import ServeConfig

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
        from ..accel_core import cache_artifacts as ca

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


def _deepcache_setting(text: str):
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


def _count(what: str, todo: str, minimum: int = 1, maximum: int | None = None):
    """argparse type: a whole number >= minimum (<= maximum); the message says what was expected, what was found, what to do."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            span = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
            raise argparse.ArgumentTypeError(f"expects {what} (a whole number {span}), found {text!r}; {todo}")
        return value
    return parse


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expects a finite number of 0 or more, found {text!r}; give e.g. --cfg-scale 7")
    return value


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it."""

    def _get_help_string(self, action):
        if "default:" in (action.help or "") or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _version() -> str:
    """Without importing torch (`sd-accel --help` / `--version` stay quick)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return f"sd-accel {of('sd-accel')} (torch {of('torch')}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    from ..accel_core.compiling import CompileConfig
    from ..accel_core.options import cli_argument
    from .measure import DEFAULT_REPEATS, default_threads
    from .models import PRESETS

    p = argparse.ArgumentParser(prog="sd-accel", description="SD Accel: Stable Diffusion acceleration, measured side by side.",
                                formatter_class=_Help)
    p.add_argument("--version", action="version", version=_version(), help="the package, torch and Python versions")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="baseline vs each acceleration: ms/step (median, min-max), speed-up, relative error, memory, compile time",
                       formatter_class=_Help, description="Times the unaccelerated baseline and each acceleration side by side in one process. "
                       "Each row: one warm-up run, then --repeats timed runs (median and min-max). Writes bench.json and bench.png.")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the UNet runs")
    b.add_argument("--host", default="auto", choices=["auto", "diffusers", "comfy"],
                   help="comfy: ComfyUI's loader, nodes and sampler, with its built-in compile node side by side (needs COMFYUI_PATH, "
                        "--comfyui-path, or this pack inside ComfyUI/custom_nodes); diffusers: a diffusers UNet in our own sampling loop; "
                        "auto: comfy when a ComfyUI tree is known, else diffusers")
    b.add_argument("--comfyui-path", default=None, help="ComfyUI folder for --host comfy (default: $COMFYUI_PATH)")
    b.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="model and size: tiny (an SD1.5-layout UNet with narrow widths, 128x128: the CPU default), sd15-512, sdxl-1024")
    b.add_argument("--steps", type=_count("the number of sampling steps", "give e.g. --steps 8, or leave it out for the preset's"), default=None,
                   help="sampling steps per run (default: the preset's: " + ", ".join(f"{k} {v.steps}" for k, v in PRESETS.items()) + ")")
    b.add_argument("--repeats", type=_count("the number of timed runs per row", "give e.g. --repeats 5 (1 shows no spread)"), default=DEFAULT_REPEATS,
                   help="timed runs per row after its warm-up run; the row shows their median and min-max")
    b.add_argument("--threads", type=_count("the number of CPU threads", "give e.g. --threads 1, or leave it out"), default=None,
                   help=f"torch CPU threads for the whole run, recorded in bench.json (default: half this machine's cores, {default_threads()} here: "
                        "a thread per core stalls whenever another process runs)")
    b.add_argument("--checkpoint", default=None, help="your SD1.x/SDXL .safetensors checkpoint or UNet file (default: seeded random weights)")
    which = b.add_mutually_exclusive_group()
    which.add_argument("--configs", nargs="+", metavar="PREFIX", default=None,
                   help="only rows whose names start with these (the baseline always runs); a prefix that matches no row lists the rows "
                        "(default: the CPU default rows on --device cpu, every row on cuda)")
    which.add_argument("--all", action="store_true", help="every row (the CPU default runs the core and DeepCache rows only)")
    b.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    b.add_argument("--seed", type=_count("a seed", "give e.g. --seed 0", 0), default=0, help="seed of the random weights, latent and conditioning")
    b.add_argument("--cfg-scale", type=_scale, default=7.0, help="classifier-free guidance scale (cond and uncond run as one batch of 2)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(fn=_bench)
    s = sub.add_parser("backends", help="which compile backends are available here", formatter_class=_Help,
                       description="Lists each compile backend (inductor, onediff, stable-fast) for this machine's device: available, "
                       "or what is missing and the command that installs it. Nothing is installed.")
    s.set_defaults(fn=_backends)
    c = sub.add_parser("cache", help="where torch.compile's caches persist between runs (ComfyUI: <ComfyUI>/user/sd_accel/compile_cache; "
                                     "webui: <webui>/cache/sd_accel/compile_cache); list or --clear them, export them to one file, import one",
                       formatter_class=_Help, description="sd-accel cache [--dir D]: list the files; --clear: delete them. "
                       "sd-accel cache export FILE: pack this folder's compiled artifacts (one torch/GPU combination) into one file for other "
                       "workers. sd-accel cache import FILE: check FILE against this machine (torch, Python, Triton, GPU) and add its artifacts "
                       "to the folder, where the next compiled run of ComfyUI, the webui or `sd-accel serve` loads them.")
    c.add_argument("action", nargs="?", choices=["list", "export", "import"], default="list", help="what to do with the folder")
    c.add_argument("file", nargs="?", default=None, help="export / import: the artifacts file")
    c.add_argument("--dir", default=None, help="the cache folder (default: $SD_ACCEL_COMPILE_CACHE, ComfyUI's when --comfyui-path or "
                                                "$COMFYUI_PATH is given, the webui's with --webui-path, else ~/.cache/sd_accel/compile_cache)")
    c.add_argument("--comfyui-path", default=None, help="a ComfyUI folder: its user/sd_accel/compile_cache")
    c.add_argument("--webui-path", default=None, help="a stable-diffusion-webui / Forge folder: its cache/sd_accel/compile_cache "
                                                      "($SD_WEBUI_CACHE_DIR/sd_accel/compile_cache when that is set)")
    c.add_argument("--clear", action="store_true", help="delete the cache files (each is compiled again on next use)")
    c.add_argument("--fingerprint", default=None, help="export: which torch/GPU combination, when the folder holds several "
                                                       "(the start of a file name, e.g. torch2.13.0_cpu-py3.11-cpu; default: the only one, else this machine's)")
    c.add_argument("--device", default=None, help="import: the device the workers run on, e.g. cuda:1 (default: the file's kind, CUDA device 0 for a GPU file)")
    c.set_defaults(fn=_cache)
    v = sub.add_parser("serve", help="serve SD sampling over HTTP with N Ray Serve replicas (one GPU each), warm from one compile",
                       formatter_class=_Help, description="Starts a Ray Serve deployment of a diffusers UNet sampling pipeline (the embedded "
                       "default model or --checkpoint). The first replica compiles and publishes its compile artifacts; the others import "
                       "them. Requests choose seed, steps, cfg, side, DeepCache and LoRAs. Needs ray[serve]. See docs/fleet.md.")
    v.add_argument("--replicas", type=_count("the number of replicas", "give e.g. --replicas 2"), default=1, help="replicas (one GPU each with --device cuda)")
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
    v.add_argument("--max-batch-size", type=_count("the largest batch", "give e.g. --max-batch-size 4"), default=4,
                   help="requests batched into one UNet call (padded to a power of two)")
    v.add_argument("--batch-wait", type=_scale, default=0.05, help="seconds a replica waits to fill a batch")
    v.add_argument("--max-steps", type=_count("the most steps a request may ask for", "give e.g. --max-steps 50"), default=50,
                   help="requests asking for more are refused")
    v.add_argument("--threads", type=_count("the number of CPU threads", "give e.g. --threads 1, or leave it out"), default=None,
                   help="torch CPU threads per replica (default: torch's)")
    v.add_argument("--warm-deepcache", nargs="+", type=_deepcache_setting, default=[(3, 0)], metavar="INTERVAL:DEPTH",
                   help="DeepCache settings compiled at start, so requests with them are served warm (others compile on first use); none: no "
                        "DeepCache warm-up (default: 3:0, a request's {\"deepcache\": {\"interval\": 3}})")
    v.add_argument("--port", type=_count("a TCP port", "give e.g. --port 8000", 1, 65535), default=8000, help="HTTP port")
    v.add_argument("--listen", default="127.0.0.1", help="HTTP address (0.0.0.0 for every interface)")
    v.add_argument("--address", default=None, help="a running Ray cluster (default: start a local one)")
    v.set_defaults(fn=_serve)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
