"""ComfyUI: will a regular copy of a DynamicVRAM model fit the GPU?

DynamicVRAM streams a model's weights to the GPU per call, so a 24 GB Flux runs on a 16 GB
card. SD Accel's nodes that change weights (Compile, FP16 Cast, LoRA Hot-Swap) run on a
regular copy instead, as ComfyUI's own TorchCompileModel does. A regular copy larger than the
GPU can hold (or than the share `torch.cuda.set_per_process_memory_fraction` leaves this
process, which ComfyUI's free-memory estimate does not see) runs out of memory mid-run; this
check says so before the copy is made.
"""
from __future__ import annotations

import torch

from ...log import logger

GB = 1024 ** 3


def gpu_budget(device: torch.device) -> tuple[int, float, int]:
    """(total bytes, this process's fraction, bytes ComfyUI keeps free for inference) of `device`."""
    import comfy.model_management as mm

    total = torch.cuda.mem_get_info(device)[1]
    probe = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = float(probe(device)) if callable(probe) else 1.0
    return total, fraction, int(mm.minimum_inference_memory())


def fits(need: int, total: int, fraction: float, reserve: int) -> bool:
    return need <= total * fraction - reserve


def regular_copy_fits(model, node: str) -> bool:
    """True when a regular copy of `model` fits its GPU (always on a CPU); else one warning saying what to do."""
    device = torch.device(model.load_device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return True
    need = int(model.model_size())
    total, fraction, reserve = gpu_budget(device)
    if fits(need, total, fraction, reserve):
        return True
    logger.warning(
        "SD Accel %s: this model needs a regular copy of about %.1f GB on the GPU, and this process may use %.1f GB of it "
        "(%.1f GB x %.2f, less %.1f GB ComfyUI keeps for inference). DynamicVRAM streams the model instead, which %s cannot "
        "do; passing the model through unchanged. Use an fp8 or smaller checkpoint, a GPU with more memory, or leave %s out.",
        node, need / GB, (total * fraction - reserve) / GB, total / GB, fraction, reserve / GB, node, node)
    return False


__all__ = ["regular_copy_fits", "fits", "gpu_budget"]
