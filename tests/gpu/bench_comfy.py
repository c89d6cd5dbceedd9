"""`sd-accel bench` on the GPU machine, from this checkout, against a (trimmed) ComfyUI tree.

    python3 tests/gpu/bench_comfy.py --host comfy --comfyui-path /tmp/ComfyUI-0.33.0 --device cuda --preset flux-1024 --repeats 2 --out $OUT/flux

The arguments are `sd-accel bench`'s. This launcher only makes the command runnable there: it imports
`sd_accel` from this checkout (through a link when the installed one is another), and where the
ComfyUI tree has no PyAV (a trimmed tree; ComfyUI imports it for video only) it puts
comfy_dynamic_vram's stand-in module in its place before ComfyUI is imported.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _link_checkout():
    found = importlib.util.find_spec("sd_accel")
    if found is None or Path(found.origin).resolve().parent != REPO:
        link_dir = Path(tempfile.mkdtemp(prefix="sd_accel_link_"))
        (link_dir / "sd_accel").symlink_to(REPO, target_is_directory=True)
        sys.path.insert(0, str(link_dir))


def _comfy_root(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--comfyui-path" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--comfyui-path="):
            return a.split("=", 1)[1]
    return os.environ.get("COMFYUI_PATH")


def main(argv: list[str]) -> int:
    _link_checkout()
    root = _comfy_root(argv)
    if root and (Path(root) / "_cpu_stubs").is_dir():  # the CPU test trees: torchvision / torchaudio stand-ins
        sys.path.append(str(Path(root) / "_cpu_stubs"))
    elif importlib.util.find_spec("av") is None:
        sys.path.insert(0, str(HERE))
        import comfy_dynamic_vram

        comfy_dynamic_vram.av_stand_in()
    from sd_accel.cli.main import main as cli

    return cli(["bench", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
