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


# --- LoRA files in the formats people have, with seeded random factors --------------------------

_BLOCKS = ("double_blocks.", "single_blocks.", "transformer_blocks.", "layers.", "noise_refiner.", "context_refiner.", "blocks.")
LORA_FORMATS = {"flux": ("kohya", "comfy", "diffusers", "xlabs"), "qwen_image": ("kohya", "comfy", "diffusers"),
                "z_image": ("kohya", "comfy", "diffusers"), "wan": ("kohya", "comfy", "lightx2v")}


def _pair(g, out_f: int, in_f: int, rank: int, scale: float = 0.05):
    down = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
    up = torch.randn(out_f, rank, generator=g) * scale
    return up, down


def _block_weights(model):
    sd = model.model.diffusion_model.state_dict()
    return {k: v for k, v in sd.items() if k.startswith(_BLOCKS) and k.endswith(".weight") and v.dim() == 2}


def _diffusers_targets(model, family: str) -> dict[str, tuple]:
    """diffusers layer name -> (ComfyUI weight name, rows) from the host's own table (comfy.utils)."""
    import comfy.utils

    fn = {"flux": "flux_to_diffusers", "z_image": "z_image_to_diffusers"}.get(family)
    sd = model.model.diffusion_model.state_dict()
    if fn is None:  # Qwen-Image: ComfyUI's module names are diffusers' names
        return {k[:-7]: (k, sd[k].shape[0]) for k in _block_weights(model)}
    out, seen = {}, set()
    for k, v in getattr(comfy.utils, fn)(model.model.model_config.unet_config).items():
        if not k.endswith(".weight") or not k.startswith(("transformer_blocks.", "single_transformer_blocks.", "layers.",
                                                          "noise_refiner.", "context_refiner.")):
            continue
        key, rows = (v[0], v[1][2]) if isinstance(v, tuple) else (v, None)
        target = (v[0], tuple(v[1])) if isinstance(v, tuple) else v
        if target in seen:
            continue  # one name per weight (aliases like ff.linear_in = ff.net.0.proj): a real file has one
        seen.add(target)
        if key in sd and sd[key].dim() == 2:
            out[k[:-7]] = (key, rows or sd[key].shape[0])
    return out


def make_lora(model, family: str, fmt: str, seed: int = 1, rank: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA state dict for the tiny `family` model in format `fmt` (see LORA_FORMATS)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    sd = model.model.diffusion_model.state_dict()
    if fmt in ("kohya", "comfy", "lightx2v"):
        for k, w in _block_weights(model).items():
            m = k[:-7]
            up, down = _pair(g, w.shape[0], w.shape[1], rank)
            if fmt == "kohya":
                base = "lora_unet_" + m.replace(".", "_")
                out[base + ".lora_up.weight"], out[base + ".lora_down.weight"] = up, down
                out[base + ".alpha"] = torch.tensor(rank / 2.0)
            else:
                base = "diffusion_model." + m
                names = (".lora_B.weight", ".lora_A.weight") if fmt == "comfy" else (".lora_up.weight", ".lora_down.weight")
                out[base + names[0]], out[base + names[1]] = up, down
                if fmt == "lightx2v":  # lightx2v's Wan LoRAs also carry bias / norm / modulation differences
                    out[base + ".alpha"] = torch.tensor(float(rank))
                    if m + ".bias" in sd:
                        out[base + ".diff_b"] = torch.randn(sd[m + ".bias"].shape, generator=g) * 0.01
        if fmt == "lightx2v":
            for k, v in sd.items():
                if k.endswith((".norm3.weight", ".modulation")):
                    out["diffusion_model." + (k[:-7] if k.endswith(".weight") else k) + ".diff"] = torch.randn(v.shape, generator=g) * 0.01
    elif fmt == "diffusers":
        for name, (key, rows) in _diffusers_targets(model, family).items():
            up, down = _pair(g, rows, sd[key].shape[1], rank)
            out[f"transformer.{name}.lora_B.weight"], out[f"transformer.{name}.lora_A.weight"] = up, down
    elif fmt == "xlabs":
        h = model.model.diffusion_model.hidden_size
        for i in range(len(model.model.diffusion_model.double_blocks)):
            for n, (o, inp) in {"qkv_lora1": (3 * h, h), "qkv_lora2": (3 * h, h), "proj_lora1": (h, h), "proj_lora2": (h, h)}.items():
                out[f"double_blocks.{i}.processor.{n}.up.weight"], out[f"double_blocks.{i}.processor.{n}.down.weight"] = _pair(g, o, inp, rank)
        for i in range(len(model.model.diffusion_model.single_blocks)):
            lin2 = sd[f"single_blocks.{i}.linear2.weight"]
            for n, (o, inp) in {"qkv_lora": (3 * h, h), "proj_lora": tuple(lin2.shape)}.items():
                out[f"single_blocks.{i}.processor.{n}.up.weight"], out[f"single_blocks.{i}.processor.{n}.down.weight"] = _pair(g, o, inp, rank)
    else:
        raise ValueError(fmt)
    return {k: v.contiguous() for k, v in out.items()}


def comfy_reference_sd(sd: dict, fmt: str) -> dict:
    """The state dict to hand ComfyUI's loader for the same LoRA: XLabs files go through ComfyUI's own
    converter (its loader converts them only when every one of Flux.1's 57 blocks is present)."""
    if fmt == "xlabs":
        import comfy.lora_convert

        return comfy.lora_convert.convert_uso_lora(sd)
    return sd


def comfy_lora_weights(model, sd: dict, strength: float) -> dict[str, torch.Tensor]:
    """The diffusion model's weights as ComfyUI's LoraLoaderModelOnly patches them (then unpatched)."""
    import comfy.sd

    ref = comfy.sd.load_lora_for_models(model, None, sd, strength, 0)[0]
    ref.patch_model()
    try:
        return weights(ref)
    finally:
        ref.unpatch_model()
