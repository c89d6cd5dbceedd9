"""LoRA hot-swap and LCM-LoRA in the webui: names from its LoRA folder, fused into a UNet in place for one generation.

The fused UNets are remembered (weakly) by a `FusedLoras` the webui session owns, so that the end
of a generation, an interrupted one or a model load puts the original weights back bit-exactly.
"""
from __future__ import annotations

import os
import sys
import weakref

from torch import nn

from ...errors import SDAccelError
from .options import WebuiOptions

LORA_EXTS = (".safetensors",)


def _dirs(lora_dirs) -> list[str]:
    if not lora_dirs:
        return []
    return [lora_dirs] if isinstance(lora_dirs, (str, os.PathLike)) else [d for d in lora_dirs if d]


def lora_files(lora_dirs) -> dict[str, str]:
    """LoRA name (file name without extension, as the webui shows it) -> path, from the webui's LoRA folder(s).

    `lora_dirs`: one folder, or several (`--lora-dir` first, then Forge Neo's `--lora-dirs`);
    a name found in an earlier folder wins, as in the webui's own list.
    """
    out: dict[str, str] = {}
    for lora_dir in _dirs(lora_dirs):
        if not os.path.isdir(lora_dir):
            continue
        for base, _, files in sorted(os.walk(lora_dir, followlinks=True)):
            for f in sorted(files):
                stem, ext = os.path.splitext(f)
                if ext.lower() in LORA_EXTS:
                    out.setdefault(stem, os.path.join(base, f))
    return out


def lora_specs(opts: WebuiOptions, lora_dirs) -> list:
    """The LoraSpecs (hot-swap list plus the LCM-LoRA) named by `opts`, resolved in the LoRA folder(s) `lora_dirs`."""
    from ...lora import LoraSpec

    files = lora_files(lora_dirs)
    wanted = list(opts.loras) if opts.loras_on else []
    if opts.lcm_on:
        wanted.append((opts.lcm_lora, opts.lcm_strength))
    specs = []
    for name, strength in wanted:
        path = files.get(name) or (name if os.path.isfile(name) else None)
        if path is None:
            known = ", ".join(sorted(files)[:12]) or "none"
            where = ", ".join(str(d) for d in _dirs(lora_dirs)) or "none set"
            raise SDAccelError(f"SD Accel: LoRA {name!r} is not in the webui's LoRA folders ({where}); found: {known}. "
                               "Use a file name from those folders (without .safetensors), or a full path to a .safetensors file.")
        specs.append(LoraSpec(path, float(strength)))
    return specs


class FusedLoras:
    """The UNets SD Accel fused LoRAs into this generation (weakly), so that their original weights come back."""

    def __init__(self):
        self.modules: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()

    def fuse(self, module: nn.Module, specs) -> str | None:
        """Bring `module`'s weights to exactly `specs` (in place); remembered so `restore` can undo it."""
        from ...lora import apply_loras

        report = apply_loras(module, specs)
        if specs:
            self.modules.add(module)
        else:
            self.modules.discard(module)
        return report.summary()

    def restore(self) -> int:
        """Put the original weights back into every UNet fused here (bit-exact). Returns how many."""
        if not self.modules:
            return 0  # nothing fused: no need for the LoRA module
        from ...lora import apply_loras

        n = 0
        for module in list(self.modules):
            apply_loras(module, [])
            self.modules.discard(module)
            n += 1
        return n


def webui_lora_active(unet: nn.Module) -> bool:
    """Whether A1111's built-in Lora extension has networks on this UNet (it patches the same weights in place)."""
    networks = sys.modules.get("networks")
    if networks is not None and getattr(networks, "loaded_networks", None):
        return True
    return any(getattr(m, "network_current_names", ()) for m in unet.modules())


__all__ = ["LORA_EXTS", "lora_files", "lora_specs", "FusedLoras", "webui_lora_active"]
