"""SD Accel install hook, for both hosts that run it.

- stable-diffusion-webui / Forge: `launch.py` runs this file at every start, with the webui's
  Python and the webui root on PYTHONPATH, so `import launch` works. Missing required packages
  are installed with `launch.run_pip` (a no-op under --skip-install).
- ComfyUI-Manager: runs it with ComfyUI's Python after installing requirements.txt; there is
  nothing left to install, so it only reports.

Never installs or changes torch. The optional compile backends (stable-fast, onediff with
oneflow) ship wheels for a few torch / CUDA / Python combinations only; this says which one
fits the detected set-up, or that none does and why. It installs one only when asked with
SD_ACCEL_INSTALL=stable-fast (the matching wheel, with --no-deps so torch stays as it is).
Fast on purpose (it runs at every webui start): torch is not imported, its version is read
from the installed metadata.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass

# import name -> pip requirement; what the pack needs besides the host's own torch.
REQUIRED = {"safetensors": "safetensors>=0.4", "numpy": "numpy", "tqdm": "tqdm"}

# stable-fast v1.0.5, the last release (2024-05): wheels on its GitHub releases page for
# Linux and Windows, Python 3.8-3.11, torch 2.2.2 / 2.3.0, CUDA 11.8 / 12.1
# (its .github/workflows/wheels.yml at tag v1.0.5).
SFAST_VERSION = "1.0.5"
SFAST_TORCH = ("2.2.2", "2.3.0")
SFAST_CUDA = ("11.8", "12.1")
SFAST_PYTHON = ((3, 8), (3, 9), (3, 10), (3, 11))
# Built on torch 2.11 + CUDA 13.0 (docs/backends.md): CUDABlas.cc and cutlass_dual_linear_kernel.cu
# call ATen APIs that changed. The first torch it breaks on is not pinned down; 2.11 is where it was seen.
SFAST_SOURCE_BREAKS = (2, 11)
# oneflow (onediff's default compiler): Linux only, from SiliconFlow's own index per CUDA
# (onediff README: community_cu118 / community_cu122), no wheels for Python 3.11+.
ONEFLOW_CUDA = {"11.8": "community_cu118", "12.1": "community_cu122", "12.2": "community_cu122"}
ONEFLOW_MAX_PYTHON = (3, 10)
PREFIX = "SD Accel install:"


@dataclass(frozen=True)
class Env:
    torch: str | None  # "2.3.0" (without the local suffix), None when torch is not installed
    cuda: str | None  # "12.1", None for CPU/ROCm/MPS builds or unknown
    python: tuple[int, int]
    platform: str  # sys.platform


def parse_torch_version(version: str) -> tuple[str, str | None]:
    """"2.3.0+cu121" -> ("2.3.0", "12.1"); "2.1.2+cpu" -> ("2.1.2", None); "2.3.0" -> ("2.3.0", None)."""
    base, _, local = version.partition("+")
    m = re.fullmatch(r"cu(\d+)(\d)", local)
    return base, (f"{m.group(1)}.{m.group(2)}" if m else None)


def _cuda_from_torch_files() -> str | None:
    # PyPI's Linux wheels carry no "+cuXXX"; torch/version.py says which CUDA they were built with.
    spec = importlib.util.find_spec("torch")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        try:
            with open(os.path.join(loc, "version.py"), encoding="utf-8") as f:
                m = re.search(r"^cuda[^=]*=\s*['\"]([\d.]+)['\"]", f.read(), re.M)
        except OSError:
            continue
        if m:
            return ".".join(m.group(1).split(".")[:2])
    return None


def detect() -> Env:
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return Env(None, None, sys.version_info[:2], sys.platform)
    base, cuda = parse_torch_version(version)
    if cuda is None and "+" not in version:
        cuda = _cuda_from_torch_files()
    return Env(base, cuda, sys.version_info[:2], sys.platform)


def _py(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def _sfast_source_note(torch_version: str | None) -> str:
    nums = re.findall(r"\d+", torch_version or "")
    if len(nums) >= 2 and (int(nums[0]), int(nums[1])) >= SFAST_SOURCE_BREAKS:
        return (f"its {SFAST_VERSION} source does not build against torch {_py(SFAST_SOURCE_BREAKS)}+ (ATen API changes "
                "in its cuBLAS and CUTLASS operators, listed in the pack's docs/backends.md)")
    return "building it from source needs nvcc and CUDA_HOME (https://github.com/chengzeyi/stable-fast#installation)"


def stable_fast_wheel(env: Env) -> tuple[str | None, str]:
    """(wheel URL or None, explanation) for stable-fast on `env`."""
    have = f"torch {env.torch or 'not installed'}, CUDA {env.cuda or 'none'}, Python {_py(env.python)}, {env.platform}"
    wheels = (f"wheels exist for torch {'/'.join(SFAST_TORCH)}, CUDA {'/'.join(SFAST_CUDA)}, "
              f"Python {_py(SFAST_PYTHON[0])}-{_py(SFAST_PYTHON[-1])}, Linux and Windows")
    plat = "manylinux2014_x86_64" if env.platform.startswith("linux") else "win_amd64" if env.platform == "win32" else None
    if env.torch not in SFAST_TORCH or env.cuda not in SFAST_CUDA or env.python not in SFAST_PYTHON or plat is None:
        return None, (f"stable-fast has no wheel for {have} ({wheels}); {_sfast_source_note(env.torch)}. "
                      "SD Accel uses inductor (torch.compile) instead.")
    tag = f"cp{env.python[0]}{env.python[1]}"
    name = f"stable_fast-{SFAST_VERSION}+torch{env.torch.replace('.', '')}cu{env.cuda.replace('.', '')}-{tag}-{tag}-{plat}.whl"
    return f"https://github.com/chengzeyi/stable-fast/releases/download/v{SFAST_VERSION}/{name}", f"stable-fast {SFAST_VERSION} has a wheel for {have}"


def onediff_status(env: Env) -> tuple[str | None, str]:
    """(install command or None, explanation) for onediff + oneflow on `env`."""
    have = f"CUDA {env.cuda or 'none'}, Python {_py(env.python)}, {env.platform}"
    if not env.platform.startswith("linux"):
        return None, f"onediff/oneflow has no wheel for {env.platform} (Linux only; on Windows use WSL2)."
    if env.python > ONEFLOW_MAX_PYTHON:
        return None, f"oneflow has no wheel for Python {_py(env.python)} (Python {_py(ONEFLOW_MAX_PYTHON)} at most); onediff cannot run here."
    index = ONEFLOW_CUDA.get(env.cuda or "")
    if index is None:
        return None, f"oneflow has no wheel for {have} (CUDA {'/'.join(ONEFLOW_CUDA)} only)."
    cmd = (f"pip install -U --pre oneflow -f https://github.com/siliconflow/oneflow_releases/releases/expanded_assets/{index} "
           "&& pip install --pre onediff")
    return cmd, f"onediff + oneflow have wheels for {have}"


def report(env: Env) -> list[str]:
    lines = []
    if env.torch is None:
        return [f"{PREFIX} torch is not installed in this Python ({sys.executable}); the host installs it, SD Accel never does."]
    if importlib.util.find_spec("sfast") is not None:
        lines.append(f"{PREFIX} stable-fast: installed.")
    else:
        url, why = stable_fast_wheel(env)
        lines.append(f"{PREFIX} stable-fast: not installed; {why}" + (f". To install: set SD_ACCEL_INSTALL=stable-fast and restart, or pip install --no-deps {url}" if url else ""))
    if importlib.util.find_spec("onediff") is not None and (importlib.util.find_spec("oneflow") or importlib.util.find_spec("nexfort")):
        lines.append(f"{PREFIX} onediff: installed.")
    else:
        cmd, why = onediff_status(env)
        lines.append(f"{PREFIX} onediff: not installed; {why}" + (f". To install: {cmd}" if cmd else ""))
    return lines


def _webui_launch():
    """The webui's `launch` module when this runs under stable-diffusion-webui / Forge, else None."""
    if importlib.util.find_spec("launch") is None or importlib.util.find_spec("modules") is None:
        return None
    import launch

    return launch if hasattr(launch, "run_pip") and hasattr(launch, "is_installed") else None


def _pip(launch, args: str, desc: str) -> None:
    if "torch" in re.split(r"[\s=<>!~\[]", args):
        raise RuntimeError(f"{PREFIX} refusing to pip-install torch ({args}); the host owns the torch build.")
    if launch is not None:
        launch.run_pip(f"install {args}", desc)
    else:
        subprocess.check_call([sys.executable, "-m", "pip", "install", *args.split()])


def main(env: Env | None = None) -> list[str]:
    env = env or detect()
    launch = _webui_launch()
    out = []
    if launch is not None:
        for module, requirement in REQUIRED.items():
            if not launch.is_installed(module):
                _pip(launch, requirement, f"{requirement} for SD Accel")
                out.append(f"{PREFIX} installed {requirement}.")
    else:
        missing = [r for m, r in REQUIRED.items() if importlib.util.find_spec(m) is None]
        if missing:
            out.append(f"{PREFIX} missing {', '.join(missing)}; ComfyUI-Manager installs requirements.txt, or run: {sys.executable} -m pip install {' '.join(missing)}")
    out += report(env)
    if importlib.util.find_spec("diffusers") is None:
        # Not installed for the user: the webui pins huggingface_hub/transformers versions that a
        # current diffusers may not accept. Only the tab's Benchmark needs it.
        out.append(f"{PREFIX} diffusers is not installed: the SD Accel tab's Benchmark needs it (pip install diffusers, "
                   "a version that accepts this webui's huggingface_hub); generation does not.")
    wanted = {w.strip() for w in os.environ.get("SD_ACCEL_INSTALL", "").split(",") if w.strip()}
    if "stable-fast" in wanted and importlib.util.find_spec("sfast") is None:
        url, why = stable_fast_wheel(env)
        if url is None:
            out.append(f"{PREFIX} SD_ACCEL_INSTALL=stable-fast: not installed, {why}")
        else:
            _pip(launch, f"--no-deps {url}", f"stable-fast {SFAST_VERSION}")  # --no-deps: torch stays as it is
            out.append(f"{PREFIX} installed stable-fast {SFAST_VERSION} ({url}).")
    for line in out:
        print(line)
    return out


if __name__ == "__main__":
    main()
