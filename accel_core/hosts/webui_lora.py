"""LoRA hot-swap and LCM-LoRA in the webui: names from its LoRA folder, fused into a UNet in place for one generation.

The fused UNets are remembered (weakly) so that the end of a generation, an interrupted one
or a model load puts the original weights back bit-exactly.
"""
from __future__ import annotations

import os
import sys
import weakref

from torch import nn

from ..errors import SDAccelError
from .webui_options import WebuiOptions

LORA_EXTS = (".safetensors",)
_fused: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def lora_files(lora_dir: str | None) -> dict[str, str]:
    """LoRA name (file name without extension, as the webui shows it) -> path, from the webui's LoRA folder."""
    out: dict[str, str] = {}
    if not lora_dir or not os.path.isdir(lora_dir):
        return out
    for base, _, files in sorted(os.walk(lora_dir, followlinks=True)):
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() in LORA_EXTS:
                out.setdefault(stem, os.path.join(base, f))
    return out


def lora_specs(opts: WebuiOptions, lora_dir: str | None) -> list:
    """The LoraSpecs (hot-swap list plus the LCM-LoRA) named by `opts`, resolved in `lora_dir`."""
    from ..lora import LoraSpec

    files = lora_files(lora_dir)
    wanted = list(opts.loras) if opts.loras_on else []
    if opts.lcm_on:
        wanted.append((opts.lcm_lora, opts.lcm_strength))
    specs = []
    for name, strength in wanted:
        path = files.get(name) or (name if os.path.isfile(name) else None)
        if path is None:
            known = ", ".join(sorted(files)[:12]) or "none"
            raise SDAccelError(f"SD Accel: LoRA {name!r} is not in the webui's LoRA folder ({lora_dir}); found: {known}. "
                               "Use a file name from that folder (without .safetensors), or a full path to a .safetensors file.")
        specs.append(LoraSpec(path, float(strength)))
    return specs


def fuse_loras(module: nn.Module, specs) -> str | None:
    """Bring `module`'s weights to exactly `specs` (in place); remembered so `restore_loras` can undo it."""
    from ..lora import apply_loras

    report = apply_loras(module, specs)
    if specs:
        _fused.add(module)
    else:
        _fused.discard(module)
    return report.summary()


def restore_loras() -> int:
    """Put the original weights back into every UNet SD Accel fused LoRAs into (bit-exact). Returns how many."""
    if not _fused:
        return 0  # nothing fused: no need for the LoRA module (a copy of SD Accel may lack it)
    from ..lora import apply_loras

    n = 0
    for module in list(_fused):
        apply_loras(module, [])
        _fused.discard(module)
        n += 1
    return n


def webui_lora_active(unet: nn.Module) -> bool:
    """Whether A1111's built-in Lora extension has networks on this UNet (it patches the same weights in place)."""
    networks = sys.modules.get("networks")
    if networks is not None and getattr(networks, "loaded_networks", None):
        return True
    return any(getattr(m, "network_current_names", ()) for m in unet.modules())


__all__ = ["LORA_EXTS", "lora_files", "lora_specs", "fuse_loras", "restore_loras", "webui_lora_active"]
