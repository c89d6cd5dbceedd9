"""Optional dependencies: probed once, imported lazily, never installed at run time."""
import functools
import importlib
import importlib.util

from .log import logger

INSTALL_HINTS = {
    "onediff": "pip install onediff (plus oneflow: see https://github.com/siliconflow/onediff#installation, or nexfort: pip install nexfort)",
    "oneflow": "see https://github.com/siliconflow/onediff#installation (oneflow has no wheel for Python 3.11+ yet)",
    "nexfort": "pip install nexfort",
    "sfast": ("stable-fast 1.0.5 has wheels for torch 2.2.2 / 2.3.0 only (https://github.com/chengzeyi/stable-fast/releases); "
              "its source does not build against torch 2.11+ (ATen dropped Context::alertCuBLASConfigNotDeterministic, and "
              "allowFP16ReductionCuBLAS / allowBF16ReductionCuBLAS return CuBLASReductionOption, not bool), so on newer torch use inductor"),
    "sfast._C": ("stable-fast is installed but its C extension does not load with this torch: install the wheel built for your "
                 "torch and CUDA, or use inductor (stable-fast 1.0.5's source does not build against torch 2.11+)"),
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
def load_error(name: str) -> str:
    """'' when `name` imports, else why not. Imports it (once per process): for compiled
    extensions that are present but built against another torch."""
    try:
        importlib.import_module(name)
    except Exception as e:  # an extension built for another torch raises ImportError, OSError or worse
        return f"{type(e).__name__}: {e}"
    return ""


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
