"""Read a user's safetensors file (LoRA, UNet, checkpoint) with clear errors for wrong files."""
from __future__ import annotations

import os

from .errors import SDAccelError


def read_safetensors(path: str, what: str = "checkpoint") -> dict:
    if not os.path.isfile(path):
        raise SDAccelError(f"SD Accel: {what} file {path!r} does not exist. Give the path of a .safetensors file.")
    try:
        from safetensors.torch import load_file

        return load_file(path)
    except Exception as e:
        raise SDAccelError(f"SD Accel: {path!r} is not a readable safetensors file ({type(e).__name__}: {str(e)[:120]}). "
                           f"Expected a .safetensors {what}; convert .ckpt/.pt files to safetensors first, or re-download a file that may be truncated.") from e


def read_safetensors_metadata(path: str) -> dict[str, str]:
    """The file's `__metadata__` strings (empty when it has none or cannot be read: callers read the tensors too, which says why)."""
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return {}
