"""The benchmark's UNets: SD1.5 / SDXL / tiny configs (diffusers names) and a user's checkpoint file."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ...accel_core.checkpoint import read_safetensors
from ...accel_core.errors import SDAccelError

# "tiny" keeps SD1.5's block layout (4 levels, 2 res blocks each, cross-attention in the first 3)
# with narrow widths.
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32)
TINY = dict(SD15, block_out_channels=(32, 64, 96, 96), cross_attention_dim=64, norm_num_groups=16, sample_size=16)

LDM_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class Preset:
    unet: dict
    latent: int  # latent side (pixels / 8)
    steps: int
    context_len: int = 77


PRESETS = {
    "tiny": Preset(TINY, 16, 8),
    "sd15-512": Preset(SD15, 64, 20),
    "sdxl-1024": Preset(SDXL, 128, 20),
}


def build_unet(preset: Preset, seed: int, device: str, dtype: torch.dtype, checkpoint: str | None = None):
    from ...accel_core.optional import require

    diffusers = require("diffusers", "the benchmark")
    if checkpoint:
        return load_checkpoint_unet(checkpoint).to(device=device, dtype=dtype).eval()
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**preset.unet)
    return unet.to(device=device, dtype=dtype).eval()


def load_checkpoint_unet(path: str):
    """A diffusers UNet from an SD1.x / SDXL single-file checkpoint or a UNet-only safetensors file."""
    sd, arch = load_unet_state_dict(path)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**(SD15 if arch == "sd15" else SDXL))
    missing, unexpected = unet.load_state_dict(sd, strict=False)
    if len(missing) > len(sd) // 10:
        raise SDAccelError(f"SD Accel bench: {path} matched only {len(sd) - len(unexpected)} of {len(unet.state_dict())} UNet weights of the {arch} architecture; expected a full SD1.x or SDXL UNet. Use a checkpoint of one of those.")
    return unet


def load_unet_state_dict(path: str) -> tuple[dict, str]:
    """(diffusers-format UNet state dict, "sd15" | "sdxl") from an LDM checkpoint, an LDM UNet-only file or a diffusers UNet file."""
    sd = read_safetensors(path)
    keys = list(sd)
    if any(k.startswith(LDM_PREFIX) for k in keys) or any(k.startswith("input_blocks.") for k in keys):
        if not any(k.startswith(LDM_PREFIX) for k in keys):
            sd = {LDM_PREFIX + k: v for k, v in sd.items()}
        arch = _arch(sd, f"{LDM_PREFIX}label_emb.0.0.weight", ".attn2.to_k.weight", path)
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        return convert_ldm_unet_checkpoint(sd, dict(SD15 if arch == "sd15" else SDXL)), arch
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


def check_checkpoint(path: str) -> None:
    """Refuse a file that is not a safetensors SD UNet, reading only its header (no weights), so a
    server can refuse it before it starts anything."""
    if not os.path.isfile(path):
        raise SDAccelError(f"SD Accel: --checkpoint {path!r} does not exist; expected an SD1.x / SDXL .safetensors file. Check the path.")
    try:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            keys = list(f.keys())
    except Exception as e:
        raise SDAccelError(f"SD Accel: {path!r} is not a readable safetensors file ({type(e).__name__}: {str(e)[:120]}). "
                           "Expected an SD1.x / SDXL .safetensors checkpoint or UNet file; convert .ckpt/.pt files to safetensors first.") from None
    if not any(k.startswith((LDM_PREFIX, "input_blocks.", "down_blocks.", "unet.down_blocks.")) for k in keys):
        raise SDAccelError(f"SD Accel: {path!r} holds no Stable Diffusion UNet weights (found {len(keys)} tensors, e.g. {', '.join(keys[:3])}). "
                           "Expected an SD1.x or SDXL checkpoint or UNet file.")
