"""The `sd-accel` command: one module per verb (bench, backends, cache, serve), each adding its own options."""
from __future__ import annotations

import argparse
import logging
import sys

from .args import Help


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
    from . import backends, cache
    from .bench import command as bench
    from .serve import command as serve

    p = argparse.ArgumentParser(prog="sd-accel", description="SD Accel: Stable Diffusion acceleration, measured side by side.",
                                formatter_class=Help)
    p.add_argument("--version", action="version", version=_version(), help="the package, torch and Python versions")
    sub = p.add_subparsers(dest="cmd", required=True)
    for verb in (bench, backends, cache, serve):
        verb.add_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
