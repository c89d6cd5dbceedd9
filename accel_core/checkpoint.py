"""Read a user's UNet (or full SD checkpoint) from safetensors, with clear errors for wrong files."""
from __future__ import annotations

import os

from .errors import SDAccelError

LDM_PREFIX = "model.diffusion_model."


def read_safetensors(path: str, what: str = "checkpoint") -> dict:
    if not os.path.isfile(path):
        raise SDAccelError(f"SD Accel: {what} file {path!r} does not exist. Give the path of a .safetensors file.")
    try:
        from safetensors.torch import load_file

        return load_file(path)
    except Exception as e:
        raise SDAccelError(f"SD Accel: {path!r} is not a readable safetensors file ({type(e).__name__}: {str(e)[:120]}). "
                           f"Expected a .safetensors {what}; convert .ckpt/.pt files to safetensors first, or re-download a file that may be truncated.") from e


def load_unet_state_dict(path: str) -> tuple[dict, str]:
    """(diffusers-format UNet state dict, "sd15" | "sdxl") from an LDM checkpoint, an LDM UNet-only file or a diffusers UNet file."""
    sd = read_safetensors(path)
    keys = list(sd)
    if any(k.startswith(LDM_PREFIX) for k in keys) or any(k.startswith("input_blocks.") for k in keys):
        if not any(k.startswith(LDM_PREFIX) for k in keys):
            sd = {LDM_PREFIX + k: v for k, v in sd.items()}
        arch = _arch(sd, f"{LDM_PREFIX}label_emb.0.0.weight", ".attn2.to_k.weight", path)
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        from .bench import SD15, SDXL

        cfg = dict(SD15 if arch == "sd15" else SDXL)
        cfg["layers_per_block"] = cfg["layers_per_block"]
        return convert_ldm_unet_checkpoint(sd, cfg), arch
    sd = {k[len("unet."):] if k.startswith("unet.") else k: v for k, v in sd.items()}
    if any(k.startswith("down_blocks.") for k in sd):
        return sd, _arch(sd, "add_embedding.linear_1.weight", ".attn2.to_k.weight", path)
    sample = ", ".join(keys[:3])
    raise SDAccelError(f"SD Accel: {path!r} holds no Stable Diffusion UNet weights (found {len(keys)} tensors, e.g. {sample}). "
                       f"Expected an SD1.x or SDXL checkpoint or UNet file (keys like 'model.diffusion_model.input_blocks...' or 'down_blocks...').")


def _arch(sd: dict, sdxl_key: str, ctx_suffix: str, path: str) -> str:
    if sdxl_key in sd:
        return "sdxl"
    ctx = next((v.shape[1] for k, v in sd.items() if k.endswith(ctx_suffix)), None)
    if ctx == 768:
        return "sd15"
    raise SDAccelError(f"SD Accel: {path!r} is a UNet with cross-attention width {ctx}; the benchmark knows SD1.x (768) and SDXL. "
                       "Use an SD1.x or SDXL checkpoint.")
