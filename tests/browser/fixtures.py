"""Model files for the browser test: a small SD1.5-architecture checkpoint and a LoRA for it.

No weights can be downloaded here, and a real SD1.5 checkpoint would take too long to sample
on a CPU, so this writes seeded random weights of a *reduced* SD1.5 UNet: the real block
types, 320 channels and 768-wide cross-attention (what ComfyUI's shape-based detection needs
to call it SD1.5), but two resolution levels with one ResBlock each instead of four with two.
CLIP-L and the VAE have their real sizes, since ComfyUI builds those from fixed configs.
Everything goes through ComfyUI's own classes for the key names and its own loader reads it
back (CheckpointLoaderSimple, LoraLoader-compatible names).

Usage (inside ComfyUI's environment): python fixtures.py <models dir>
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

CHECKPOINT = "sdaccel-tiny-sd15.safetensors"
LORA = "sdaccel-tiny-lora.safetensors"

TINY_SD15 = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
}
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def _random_state(module: torch.nn.Module, prefix: str, g: torch.Generator, std: float = 0.02) -> dict:
    sd = {}
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for name, sub in module.named_modules():
        for pname, p in sub.named_parameters(recurse=False):
            if isinstance(sub, norms) or "norm" in type(sub).__name__.lower():
                t = torch.ones(p.shape) if pname == "weight" else torch.zeros(p.shape)
            else:
                t = torch.randn(p.shape, generator=g) * std
            sd[f"{prefix}{name}.{pname}" if name else f"{prefix}{pname}"] = t.half()
    return sd


def _unet(g):
    import comfy.supported_models

    mc = comfy.supported_models.SD15(dict(TINY_SD15))
    mc.set_inference_dtype(torch.float16, None)
    with torch.device("meta"):
        unet = mc.get_model({}, "", device=torch.device("meta")).diffusion_model
    return _random_state(unet, "model.diffusion_model.", g)


def _clip(g):
    import comfy.sd1_clip

    with torch.device("meta"):
        clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
    sd = _random_state(clip.transformer, "cond_stage_model.transformer.", g)
    sd = {k: v for k, v in sd.items() if "text_projection" not in k}
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return sd


def _vae(g):
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4)
    return _random_state(vae, "first_stage_model.", g)


def _lora(rank: int = 4, std: float = 0.05, seed: int = 1) -> dict:
    # kohya names over the attention layers, diffusers module paths as real SD1.5 LoRA files use.
    import comfy.utils

    g = torch.Generator().manual_seed(seed)
    unet_sd = _unet(torch.Generator().manual_seed(0))
    sd = {}
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(dict(TINY_SD15)).items():
        if "attentions" not in diffusers_key or not diffusers_key.endswith(".weight") or ".to_" not in diffusers_key:
            continue
        w = unet_sd.get("model.diffusion_model." + ldm_key)
        if w is None or w.dim() != 2:
            continue
        name = "lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_")
        sd[f"{name}.lora_down.weight"] = (torch.randn((rank, w.shape[1]), generator=g) * std).half()
        sd[f"{name}.lora_up.weight"] = (torch.randn((w.shape[0], rank), generator=g) * std).half()
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
    return sd


def write(models: Path, seed: int = 0) -> dict[str, Path]:
    """Write the checkpoint and the LoRA under `models`/{checkpoints,loras}; reuse existing files."""
    import comfy.utils

    out = {"checkpoint": models / "checkpoints" / CHECKPOINT, "lora": models / "loras" / LORA}
    for p in out.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    if not out["checkpoint"].exists():
        g = torch.Generator().manual_seed(seed)
        sd = {**_unet(g), **_clip(g), **_vae(g)}
        comfy.utils.save_torch_file(sd, str(out["checkpoint"]))
    if not out["lora"].exists():
        comfy.utils.save_torch_file(_lora(), str(out["lora"]))
    return out


def _setup_comfy_path():
    root = Path(os.environ["COMFYUI_PATH"]).resolve()
    sys.path.insert(0, str(root))
    if (root / "_cpu_stubs").is_dir():  # CPU machines without torchvision
        sys.path.append(str(root / "_cpu_stubs"))
    from comfy.cli_args import args

    args.cpu = True


if __name__ == "__main__":
    _setup_comfy_path()
    for kind, path in write(Path(sys.argv[1])).items():
        print(f"{kind}: {path} ({path.stat().st_size / 2**20:.0f} MiB)")
