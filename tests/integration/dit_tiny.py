"""LoRA files for the reduced-size DiT models of `dit_models` (ComfyUI's own Flux, Qwen-Image,
Z-Image, Wan, LTX-Video, LTX-2, MiniMax H3 classes), in the formats people have, with seeded random factors; and ComfyUI's own
LoraLoader result for them, to compare with.
"""
from __future__ import annotations

import torch

import dit_models

FAMILIES = dit_models.FAMILIES


def skip_reason(family: str) -> str | None:
    return dit_models.available(family)


_CLASSES = {"flux": ("comfy.ldm.flux.model", "Flux"), "qwen_image": ("comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel"),
            "zimage": ("comfy.ldm.lumina.model", "NextDiT"), "wan": ("comfy.ldm.wan.model", "WanModel"),
            "ltx": ("comfy.ldm.lightricks.model", "LTXVModel"), "ltx2": ("comfy.ldm.lightricks.av_model", "LTXAVModel"),
            "minimax": ("comfy.ldm.minimax.model", "MiniMaxH3Model")}


def _accepted(family: str, cfg: dict) -> dict:
    """The keys of `cfg` this host's model class takes (older hosts lack e.g. Flux's txt_ids_dims, NextDiT's rope_theta)."""
    import dataclasses
    import importlib
    import inspect

    mod_name, cls_name = _CLASSES[dit_models.SPECS[family].family or family]
    mod = importlib.import_module(mod_name)
    params = inspect.signature(getattr(mod, cls_name).__init__).parameters
    if hasattr(mod, "FluxParams"):  # Flux hands **kwargs to its params dataclass
        names = set(params) | {f.name for f in dataclasses.fields(mod.FluxParams)}
    elif any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return cfg
    else:
        names = set(params)
    return {k: v for k, v in cfg.items() if k in names}


def tiny_model(family: str, seed: int = 0):
    """A ModelPatcher over the tiny seeded `family` model of `dit_models` (ComfyUI's own class), built
    with the config keys this host's class takes."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    spec = dit_models.SPECS[family]
    name = next(n for n in spec.config_class if hasattr(sm, n))
    cfg = dict(spec.unet_config)
    if family == "zimage" and name == "ZImage":
        cfg.update(dit_models.ZIMAGE_EXTRA)
    mc = getattr(sm, name)(_accepted(family, cfg))
    mc.set_inference_dtype(torch.float32, None)
    base = mc.get_model({}, "", device=torch.device("cpu"))
    dit_models.seed_weights(base.diffusion_model, seed, spec.std)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def weights(model) -> dict[str, torch.Tensor]:
    """Every parameter of the MODEL's diffusion model, by name (cloned)."""
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def inputs(family: str, seed: int = 5):
    """(x, timestep, context, extra kwargs) for one direct call of the tiny `family` model."""
    spec = dit_models.SPECS[family]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.latent_shape, generator=g)
    ctx = torch.randn(1, 6, spec.context_dim, generator=g)
    extra = {}
    if family == "flux":
        extra = {"y": torch.randn(spec.extra_cond["pooled_output"], generator=g), "guidance": torch.tensor([3.5])}
    elif family in ("ltx", "ltx2"):  # LTXVModel's forward takes the text's attention mask as a required argument
        extra = {"attention_mask": None}
    if spec.audio_shape is not None:  # the (video, audio) pair; MiniMax H3: a single batch, timestep = sigma * 1000
        return [x, torch.randn(spec.audio_shape, generator=g)], torch.tensor([700.0 if family == "minimax" else 0.7]), ctx, extra
    return x, torch.tensor([0.7]), ctx, extra


# --- LoRA files in the formats people have, with seeded random factors --------------------------

_BLOCKS = ("double_blocks.", "single_blocks.", "transformer_blocks.", "layers.", "noise_refiner.", "context_refiner.", "blocks.",
           "token_refiner.blocks.")
LORA_FORMATS = {"flux": ("kohya", "comfy", "diffusers", "xlabs"), "qwen_image": ("kohya", "comfy", "diffusers"),
                "zimage": ("kohya", "comfy", "diffusers"), "wan": ("kohya", "comfy", "lightx2v"), "ltx": ("kohya", "comfy", "diffusers"),
                "ltx2": ("kohya", "comfy", "diffusers"), "minimax": ("kohya", "comfy")}  # ComfyUI maps no other MiniMax H3 names


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

    fn = {"flux": "flux_to_diffusers", "zimage": "z_image_to_diffusers"}.get(family)
    sd = model.model.diffusion_model.state_dict()
    if fn is None:  # Qwen-Image, LTX-Video, LTX-2: ComfyUI's module names are diffusers' names
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


def comfy_reference_sd(sd: dict, fmt: str, family: str | None = None) -> dict:
    """The state dict to hand ComfyUI's loader for the same LoRA: XLabs files go through ComfyUI's own
    converter (its loader converts them only when every one of Flux.1's 57 blocks is present). ComfyUI
    maps no `transformer.` names for LTX-Video: a user converts a diffusers LTX LoRA to `diffusion_model.`
    names (LTX-Video-Trainer's converter swaps the prefix), and that file is the reference."""
    if fmt == "xlabs":
        import comfy.lora_convert

        return comfy.lora_convert.convert_uso_lora(sd)
    if fmt == "diffusers" and family in ("ltx", "ltx2", "ltx23"):
        return {"diffusion_model." + k[len("transformer."):]: v for k, v in sd.items()}
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


def conditioning(family: str, seed: int = 3):
    """dit_models' conditioning, plus the text attention mask Lumina 2 hosts (0.3.64) need for `num_tokens`."""
    pos, neg = dit_models.conditioning(family, seed)
    if family == "zimage":
        for c in (pos, neg):
            c[0][1]["attention_mask"] = torch.ones(1, c[0][0].shape[1], dtype=torch.long)
    return pos, neg


def sample(model, family: str, steps: int = 2, cfg: float = 1.0, seed: int = 42, size: int = 8, sampler: str = "euler",
           scheduler: str = "simple") -> torch.Tensor:
    import nodes

    pos, neg = conditioning(family)
    with torch.inference_mode():
        out = nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, pos, neg, dit_models.latent(family, size))
    return dit_models.flat(out[0]["samples"]).clone()
