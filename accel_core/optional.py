"""Optional dependencies: probed once, imported lazily, never installed at run time."""
import functools
import importlib
import importlib.util

from .log import logger

INSTALL_HINTS = {
    "onediff": "pip install onediff (plus oneflow: see https://github.com/siliconflow/onediff#installation, or nexfort: pip install nexfort)",
    "oneflow": "see https://github.com/siliconflow/onediff#installation (oneflow has no wheel for Python 3.11+ yet)",
    "nexfort": "pip install nexfort",
    "sfast": "pip install stable-fast (pick the wheel matching your torch/CUDA: https://github.com/chengzeyi/stable-fast/releases)",
    "triton": "pip install triton (Linux + NVIDIA only)",
    "diffusers": "pip install diffusers",
    "matplotlib": "pip install matplotlib",
}


@functools.lru_cache(maxsize=None)
def is_available(name: str) -> bool:
    """True when `name` can be imported. Looks at the import system only once per process."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def _warned(name: str, purpose: str) -> bool:
    logger.warning("SD Accel: %s is not installed, %s. To enable it: %s", name, purpose, INSTALL_HINTS.get(name, f"pip install {name}"))
    return True


def warn_missing(name: str, purpose: str) -> None:
    """Log one line (once per process and purpose) naming the install command."""
    _warned(name, purpose)


def require(name: str, purpose: str):
    """Import `name` or raise ImportError with the install command in the text."""
    if not is_available(name):
        raise ImportError(f"SD Accel: {purpose} needs {name}, which is not installed. Install it with: {INSTALL_HINTS.get(name, 'pip install ' + name)}")
    return importlib.import_module(name)
