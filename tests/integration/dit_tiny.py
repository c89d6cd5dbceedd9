"""Reduced-size DiT MODELs of ComfyUI's own classes (Flux, Qwen-Image, Z-Image, Wan), seeded.

Built through `comfy.supported_models.<Family>(unet_config).get_model(...)`, as ComfyUI's loader
does after detecting a checkpoint, with tiny width and depth: the module tree, parameter names
and fused layouts (Flux's qkv / linear1, Z-Image's qkv) are the real ones. Keys a host's class
does not take are dropped (hosts differ: Flux's `txt_ids_dims` is newer than 0.3.64).
"""
from __future__ import annotations

import dataclasses
import inspect

import torch

FAMILIES = ("flux", "qwen_image", "z_image", "wan")

_CONFIGS = {
    "flux": ("Flux", "comfy.ldm.flux.model", dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=16, context_in_dim=32, hidden_size=32,
        mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10000, patch_size=2,
        qkv_bias=True, guidance_embed=True, txt_ids_dims=[])),
    "qwen_image": ("QwenImage", "comfy.ldm.qwen_image.model", dict(
        image_model="qwen_image", in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))),
    "z_image": ("ZImage", "comfy.ldm.lumina.model", dict(  # dim >= 256: its modulation input is min(dim, 256) wide
        image_model="lumina2", patch_size=2, in_channels=16, dim=256, n_layers=2, n_refiner_layers=1, n_heads=4,
        n_kv_heads=4, multiple_of=16, ffn_dim_multiplier=8.0 / 3.0, qk_norm=True, cap_feat_dim=32, axes_dims=[16, 24, 24],
        axes_lens=[64, 64, 64], rope_theta=256.0, z_image_modulation=True, time_scale=1000.0)),
    "wan": ("WAN21_T2V", "comfy.ldm.wan.model", dict(
        image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=32, ffn_dim=64,
        freq_dim=32, text_dim=32, out_dim=16, num_heads=2, num_layers=2, window_size=(-1, -1), qk_norm=True,
        cross_attn_norm=True, eps=1e-6)),
}


def skip_reason(family: str) -> str | None:
    import comfy.supported_models as sm

    name = _CONFIGS[family][0]
    if not hasattr(sm, name):
        return f"this ComfyUI has no {family} model class (comfy.supported_models.{name})"
    return None


def _accepted(module_name: str, cfg: dict) -> dict:
    import importlib

    mod = importlib.import_module(module_name)
    cls = {"comfy.ldm.flux.model": "Flux", "comfy.ldm.qwen_image.model": "QwenImageTransformer2DModel",
           "comfy.ldm.lumina.model": "NextDiT", "comfy.ldm.wan.model": "WanModel"}[module_name]
    params = set(inspect.signature(getattr(mod, cls).__init__).parameters)
    fields = {f.name for f in dataclasses.fields(mod.FluxParams)} if hasattr(mod, "FluxParams") else set()
    return {k: v for k, v in cfg.items() if k in params or k in fields}


def tiny_model(family: str, seed: int = 0, std: float = 0.05, dtype: torch.dtype = torch.float32):
    """A ModelPatcher over a tiny seeded `family` model of this ComfyUI's class."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    name, module_name, cfg = _CONFIGS[family]
    mc = getattr(sm, name)(_accepted(module_name, dict(cfg)))
    mc.set_inference_dtype(dtype, None)
    bm = mc.get_model({}, "", device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bm.diffusion_model.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
    return comfy.model_patcher.ModelPatcher(bm, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def weights(model) -> dict[str, torch.Tensor]:
    """Every parameter of the MODEL's diffusion model, by name (cloned)."""
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def inputs(family: str, seed: int = 5):
    """(x, timestep, context, extra kwargs) for one call of the tiny `family` model."""
    g = torch.Generator().manual_seed(seed)
    if family in ("wan", "qwen_image"):  # video-shaped latents (Wan21 latent format)
        x = torch.randn(1, 16, 1, 8, 8, generator=g)
    else:
        x = torch.randn(1, 16, 8, 8, generator=g)
    ctx = torch.randn(1, 6, 32, generator=g)
    t = torch.tensor([0.7])
    extra = {}
    if family == "flux":
        extra = {"y": torch.randn(1, 16, generator=g), "guidance": torch.tensor([3.5])}
    if family == "z_image":
        extra = {"num_tokens": 6}
    return x, t, ctx, extra
