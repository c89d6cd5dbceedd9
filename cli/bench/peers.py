"""The peers the DiT bench times beside ours: ComfyUI's own fp8 path and Comfy-WaveSpeed.

- ComfyUI's fp8: the Load Diffusion Model node's `weight_dtype` "fp8_e4m3fn_fast" (fp8 weights and
  fp8 matmuls, what `--fast fp8_matrix_mult` turns on process-wide), a second load of the same file.
- Comfy-WaveSpeed (not on PyPI): `--wavespeed FOLDER` names a checkout. Its First Block Cache and
  its Compile Model+ are imported as a package without its `__init__`, which also pulls its
  optional quantization nodes; ComfyUI's own root must be importable (`folder_paths`).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from ...accel_core.errors import SDAccelError

WAVESPEED_PACKAGE = "sd_accel_bench_wavespeed"
FBCACHE_THRESHOLD = 0.12  # WaveSpeed's README value for Flux


def comfy_fp8(path: str):
    """The model file loaded as ComfyUI's Load Diffusion Model does with weight_dtype "fp8_e4m3fn_fast"."""
    import comfy.sd
    import torch

    return comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.float8_e4m3fn, "fp8_optimizations": True})


def wavespeed_module(folder: str, name: str):
    """One module of a Comfy-WaveSpeed checkout (`fbcache_nodes`, `misc_nodes`), imported once per process."""
    root = Path(folder).expanduser().resolve()
    if not (root / "fbcache_nodes.py").is_file():
        raise SDAccelError(f"SD Accel bench: --wavespeed expects a Comfy-WaveSpeed checkout (a folder with fbcache_nodes.py), "
                           f"found {str(root)!r}. Clone github.com/chengzeyi/Comfy-WaveSpeed and give its folder.")
    if WAVESPEED_PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(WAVESPEED_PACKAGE, str(root / "__init__.py"), submodule_search_locations=[str(root)])
        sys.modules[WAVESPEED_PACKAGE] = importlib.util.module_from_spec(spec)  # the package, its __init__ not run
    return importlib.import_module(f"{WAVESPEED_PACKAGE}.{name}")


def _node_out(out):
    return out.result[0] if hasattr(out, "result") else out[0]


def wavespeed_fbcache(model, folder: str, threshold: float = FBCACHE_THRESHOLD):
    """WaveSpeed's Apply First Block Cache as a user fills it in: the diffusion model, `threshold`, no cap, the whole run."""
    node = wavespeed_module(folder, "fbcache_nodes").ApplyFBCacheOnModel()
    return _node_out(node.patch(model, "diffusion_model", threshold, max_consecutive_cache_hits=-1, start=0.0, end=1.0))


def wavespeed_compile(model, folder: str, mode: str = "reduce-overhead", backend: str = "inductor"):
    """WaveSpeed's Compile Model+ (EnhancedCompileModel) on the diffusion model with torch.compile, `mode` and `backend`."""
    node = wavespeed_module(folder, "misc_nodes").EnhancedCompileModel()
    return _node_out(node.patch(model, True, "diffusion_model", "torch.compile", False, False, mode, "", False, backend))


__all__ = ["comfy_fp8", "wavespeed_module", "wavespeed_fbcache", "wavespeed_compile", "FBCACHE_THRESHOLD"]
