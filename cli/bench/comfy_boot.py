"""`sd-accel bench --host comfy`: find ComfyUI, import it as its main.py would (DynamicVRAM included), name its version."""
from __future__ import annotations

import logging
import os
import sys

from ...accel_core.errors import SDAccelError, choice_error
from ...accel_core.log import logger

DYNAMIC_VRAM = ("auto", "on", "off")


def comfy_root(path: str | None) -> str:
    path = path or os.environ.get("COMFYUI_PATH")
    if not path:
        raise SDAccelError("SD Accel bench --host comfy: no ComfyUI tree given. Set COMFYUI_PATH to the ComfyUI folder (the one holding main.py and comfy/), or pass --comfyui-path.")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(os.path.join(path, "comfy", "sd.py")):
        raise SDAccelError(f"SD Accel bench --host comfy: {path} is not a ComfyUI tree (expected comfy/sd.py inside it). Point COMFYUI_PATH or --comfyui-path at the ComfyUI folder.")
    return path


def import_comfy(path: str, device: str, dynamic_vram: str = "off"):
    """Put ComfyUI on sys.path and import what the benchmark drives, as its CLI defaults would.

    `dynamic_vram`: "auto" turns DynamicVRAM on where ComfyUI's main.py would (a ComfyUI with
    comfy-aimdo, an NVIDIA GPU, torch >= 2.8), "on" requires it, "off" keeps the classic
    ModelPatcher. Returns (comfy.model_management, whether DynamicVRAM is on).
    """
    if dynamic_vram not in DYNAMIC_VRAM:
        raise choice_error("dynamic_vram", dynamic_vram, DYNAMIC_VRAM)
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args

    if device == "cpu":
        args.cpu = True  # read when comfy.model_management is first imported
    want = dynamic_vram != "off" and device == "cuda"
    aimdo = _aimdo_init(args) if want else None
    try:
        import comfy.model_management as mm
        import comfy.sample  # noqa: F401
        import comfy.sd  # noqa: F401
    except ImportError as e:
        raise SDAccelError(f"SD Accel bench --host comfy: ComfyUI at {path} does not import here ({type(e).__name__}: {e}). "
                           f"Expected ComfyUI's requirements in this Python; install them with torch pinned "
                           f"(pip install -r {os.path.join(path, 'requirements.txt')} -c <a file holding torch==<your version>>).") from e

    if device == "cuda" and mm.get_torch_device().type != "cuda":
        raise SDAccelError(f"SD Accel bench: --device cuda was asked for, but ComfyUI picked {mm.get_torch_device()} (was it imported earlier with --cpu?).")
    on = _aimdo_devices(aimdo, args, mm) if aimdo is not None else False
    if dynamic_vram == "on" and not on:
        raise SDAccelError("SD Accel bench: --dynamic-vram on was asked for, but this ComfyUI cannot run DynamicVRAM here (it needs "
                           "ComfyUI >= 0.4 with comfy-aimdo installed, an NVIDIA GPU and torch >= 2.8). Use --dynamic-vram auto or off.")
    return mm, on


def _aimdo_init(args):
    """comfy_aimdo.control.init, before comfy.model_management is imported (main.py's order); None where it cannot run."""
    try:
        from comfy.cli_args import enables_dynamic_vram
        import comfy_aimdo.control as aimdo
    except ImportError:
        return None
    if "comfy.model_management" in sys.modules:
        logger.warning("SD Accel bench: ComfyUI was imported before the bench could turn DynamicVRAM on; running without it.")
        return None
    if not (getattr(args, "enable_dynamic_vram", False) or enables_dynamic_vram()):
        return None
    import torch

    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 8):
        return None  # main.py falls back to the classic ModelPatcher below torch 2.8
    reserve = getattr(args, "reserve_vram", None)
    headroom = None if reserve is None else int(reserve * 1024 ** 3)
    for kw in ({"simple_vram_headroom": headroom, "nvml_pressure": not getattr(args, "disable_nvml_pressure", False)},
               {"simple_vram_headroom": headroom}, {}):  # comfy-aimdo 0.4.11+, 0.4.10, 0.4.9 protocols
        try:
            aimdo.init(**kw)
            return aimdo
        except TypeError:
            continue
    return None


def _aimdo_devices(aimdo, args, mm) -> bool:
    """The rest of main.py's DynamicVRAM start: devices, the dynamic ModelPatcher as the core one."""
    import comfy.memory_management
    import comfy.model_patcher

    if not mm.is_nvidia():
        return False
    devices = mm.get_all_torch_devices()
    try:
        ok = aimdo.init_devices((d.index, int(getattr(args, "vram_headroom", 0) * 1024 ** 3)) for d in devices)
    except TypeError:
        ok = aimdo.init_devices(d.index for d in devices)
    if not ok:
        logging.warning("SD Accel bench: comfy-aimdo did not start on this GPU; DynamicVRAM off (the classic ModelPatcher)")
        return False
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    logger.info("SD Accel bench: DynamicVRAM on, as ComfyUI's main.py starts it")
    return True


def comfy_version(path: str) -> str:
    try:
        import comfyui_version

        return comfyui_version.__version__
    except Exception:
        return os.path.basename(path)


__all__ = ["comfy_root", "import_comfy", "comfy_version", "DYNAMIC_VRAM"]
