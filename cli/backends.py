"""`sd-accel backends`: which compile backends this machine can use, and how to install the others."""
from __future__ import annotations

import argparse

from .args import Help


def run(args) -> int:
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


def add_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("backends", help="which compile backends are available here", formatter_class=Help,
                       description="Lists each compile backend (inductor, onediff, stable-fast) for this machine's device: available, "
                       "or what is missing and the command that installs it. Nothing is installed.")
    s.set_defaults(fn=run)
    return s
