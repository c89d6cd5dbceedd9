"""`sd-accel cache`: list, clear, export and import a host's compile-cache folder (the work is the core's)."""
from __future__ import annotations

import argparse
import os
import sys

from .args import Help


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


def run(args) -> int:
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


def add_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("cache", help="where torch.compile's caches persist between runs (ComfyUI: <ComfyUI>/user/sd_accel/compile_cache; "
                                     "webui: <webui>/cache/sd_accel/compile_cache); list or --clear them, export them to one file, import one",
                       formatter_class=Help, description="sd-accel cache [--dir D]: list the files; --clear: delete them. "
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
    c.set_defaults(fn=run)
    return c
