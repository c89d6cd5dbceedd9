"""Reduced-size DiT models of each family's real ComfyUI class, for CPU tests.

`build(family)` makes a MODEL (ModelPatcher) through ComfyUI's own model config
(`comfy.supported_models`), base model class and `operations`, with seeded weights. Flux, LTX-Video,
LTX-2 and MiniMax H3 (`Spec.detected`) go through a safetensors file and `comfy.sd.load_diffusion_model`,
so shape detection recognises the reduced model too; the others cannot (their detection fixes head
counts and widths that a reduced model does not have), so they are built from the config directly.

`conditioning(family)` / `latent(family)` give inputs of the right shapes for
`nodes.common_ksampler` (MiniMax H3: a (video, audio) NestedTensor latent; `sample` returns it flat). Each family has a `Spec`; `available(family)` says why a host lacks one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

FAMILIES = ("flux", "qwen_image", "zimage", "wan", "ltx", "ltx2", "minimax")


@dataclass(frozen=True)
class Spec:
    config_class: tuple[str, ...]  # comfy.supported_models class names, first one present wins
    unet_config: dict
    context_dim: int
    latent_shape: tuple
    extra_cond: dict = field(default_factory=dict)
    n_blocks: dict = field(default_factory=dict)  # block list attr -> count (for tests)
    detected: bool = False  # ComfyUI's detection recognises the reduced state dict: built through the file loader
    file_config: bool = False  # the file carries its config in its metadata (LTX-2's released files do); detection reads it
    audio_shape: tuple | None = None  # an audio+video model: the latent is ComfyUI's NestedTensor (video, audio of this shape)
    std: float = 0.05  # seeded weights ~ N(0, std)
    family: str | None = None  # a variant of a registered family (VARIANTS): that family's name; None: the key is the family
    needs: tuple = ()  # (module, class, __init__ parameters) the host's class must take (a variant's options)


SPECS = {
    "flux": Spec(("Flux",), dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=128,
                                  mlp_ratio=4.0, num_heads=1, depth=2, depth_single_blocks=3, axes_dim=[16, 56, 56], theta=10000,
                                  patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[]),
                 64, (1, 16, 8, 8), {"pooled_output": (1, 32), "guidance": 3.5}, {"double_blocks": 2, "single_blocks": 3}, detected=True),
    "qwen_image": Spec(("QwenImage",), dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=3, attention_head_dim=128,
                                            num_attention_heads=1, joint_attention_dim=48),
                       48, (1, 16, 1, 8, 8), {}, {"transformer_blocks": 3}),
    "zimage": Spec(("ZImage", "Lumina2"), dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, n_layers=3, n_refiner_layers=1,
                                               n_heads=8, n_kv_heads=8, multiple_of=16, ffn_dim_multiplier=8.0 / 3.0, norm_eps=1e-5, qk_norm=True,
                                               cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[64, 64, 64], rope_theta=256.0),
                   32, (1, 16, 8, 8), {"attention_mask": torch.ones(1, 8, dtype=torch.int64)},  # 0.3.64's Lumina 2 takes num_tokens from it
                   {"layers": 3, "noise_refiner": 1, "context_refiner": 1}),
    "wan": Spec(("WAN21_T2V",), dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=64, ffn_dim=128,
                                     freq_dim=32, text_dim=48, out_dim=16, num_heads=2, num_layers=3),
                48, (1, 16, 1, 8, 8), {}, {"blocks": 3}),
    # LTX-Video: detection fixes 32 heads, the 128-channel latent and the 4096-wide T5 text (0.3.64 reads no
    # config from the file's metadata), so the reduced model keeps those and narrows the heads (2 wide: width 64).
    # A 5-D video latent (B, 128, T, H, W) with 2 frames; the forward requires the text's attention mask.
    "ltx": Spec(("LTXV",), dict(image_model="ltxv", in_channels=128, num_attention_heads=32, attention_head_dim=2, cross_attention_dim=64,
                                caption_channels=4096, num_layers=2),
                4096, (1, 128, 2, 8, 8), {"attention_mask": torch.ones(1, 8, dtype=torch.int64)}, {"transformer_blocks": 2}, detected=True),
    # LTX-2 (LTXAVModel, 0.8.0+): detection fixes the audio widths (a ~867M-parameter audio half) unless the
    # file's metadata carries the transformer config, as the released LTX-2 files do; the reduced file does. The latent is a (video [B, 128, T, H, W], audio [B, 8, T_audio, 16])
    # NestedTensor, as LTXVConcatAVLatent makes; the text is the video and audio halves side by side (2 x 32
    # wide: 0.33 takes it as already through its connectors, 0.8.0 has none in the model).
    "ltx2": Spec(("LTXAV",), dict(image_model="ltxav", in_channels=128, audio_in_channels=128, num_attention_heads=2, attention_head_dim=16,
                                  cross_attention_dim=32, audio_num_attention_heads=2, audio_attention_head_dim=16,
                                  audio_cross_attention_dim=32, caption_channels=32, num_layers=3, connector_attention_head_dim=16,
                                  connector_num_attention_heads=2, connector_num_layers=1),
                 64, (1, 128, 2, 8, 8), {"attention_mask": torch.ones(1, 8, dtype=torch.int64)}, {"transformer_blocks": 3},
                 detected=True, file_config=True, audio_shape=(1, 8, 4, 16), std=0.1),  # its gates are small: at 0.05 two LoRAs' results differ by ~1e-3 only
    # MiniMax H3 (0.33+): one packed sequence of text, audio and video rows; detection reads every width from the
    # shapes. The latent is a (video [B, 24, T, H, W], audio [B, 32, 2, T_audio]) NestedTensor, as its
    # EmptyMiniMaxH3LatentAV node makes; rope over 3 x 4 frequencies (24 of the 32-wide heads rotate).
    "minimax": Spec(("MiniMaxH3",), dict(image_model="minimax_h3", hidden_size=64, num_layers=3, token_refiner_num_layers=1,
                                         num_attention_heads=2, attention_head_dim=32, ffn_hidden_size=128, latents_dim=24,
                                         audio_latents_dim=32, text_dim=32, timestep_input_dim=32, time_embed_hidden_size=64,
                                         time_embed_dim=32, rope_inv_freq_len=4),
                    32, (1, 24, 2, 8, 8), {}, {"blocks": 3}, detected=True, audio_shape=(1, 32, 2, 4),
                    std=0.1),  # its blocks' gates are small: at 0.05 a LoRA on them moves the result by 3e-4 only
}
# LTX-2.3 (ComfyUI 0.33's LTXAVModel with the options the released LTX-2.3 files turn on in their metadata config:
# per-head gated attention in every attention and in the text connectors, AdaLN-modulated text cross-attention with
# the prompt_adaln_single timestep embeddings, the text projection before the connectors (here the identity), split
# float64 RoPE, middle-of-token positions). 16 heads, 2 wide: the per-head gates are 16 wide, a size fp8 could take.
# The text comes unprocessed ([video | audio] widths side by side) and without a mask, as LTX-2.3's text encoder
# hands it (`unprocessed_ltxav_embeds`): the model's connectors run on it once per run and pad it to 1024 rows.
SPECS["ltx23"] = Spec(("LTXAV",), dict(SPECS["ltx2"].unet_config, num_attention_heads=16, attention_head_dim=2, audio_num_attention_heads=16,
                                       audio_attention_head_dim=2, apply_gated_attention=True, connector_apply_gated_attention=True,
                                       cross_attention_adaln=True, caption_proj_before_connector=True,
                                       caption_projection_first_linear=False, rope_type="split", frequencies_precision="float64",
                                       use_middle_indices_grid=True),
                      64, (1, 128, 2, 8, 8), {"unprocessed_ltxav_embeds": True},
                      {"transformer_blocks": 3}, detected=True, file_config=True, audio_shape=(1, 8, 4, 16), std=0.1, family="ltx2",
                      needs=("comfy.ldm.lightricks.av_model", "BasicAVTransformerBlock", ("apply_gated_attention", "cross_attention_adaln")))
VARIANTS = ("ltx23",)  # models of a registered family with options of their own (Spec.family)
ZIMAGE_EXTRA = dict(z_image_modulation=True, time_scale=1000.0)


def available(family: str) -> str | None:
    """None, or why this ComfyUI lacks the family's model config."""
    import importlib
    import inspect

    import comfy.supported_models as sm

    spec = SPECS[family]
    if not any(hasattr(sm, n) for n in spec.config_class):
        return f"this ComfyUI has no {' / '.join(spec.config_class)} model config (the family is newer)"
    if spec.needs:
        mod, cls, params = spec.needs
        have = inspect.signature(getattr(importlib.import_module(mod), cls).__init__).parameters
        if not all(p in have for p in params):
            return f"this ComfyUI's {cls} takes no {' / '.join(params)} ({family}'s options are newer)"
    return None


def _config(family: str):
    import comfy.supported_models as sm

    spec = SPECS[family]
    name = next(n for n in spec.config_class if hasattr(sm, n))
    unet_config = dict(spec.unet_config)
    if family == "zimage" and name == "ZImage":
        unet_config.update(ZIMAGE_EXTRA)
    if family == "zimage":  # 0.3.64's NextDiT (Lumina 2 only) takes fewer arguments (no rope_theta)
        import inspect

        from comfy.ldm.lumina.model import NextDiT

        params = inspect.signature(NextDiT.__init__).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            unet_config = {k: v for k, v in unet_config.items() if k in params or k == "image_model"}
    if family == "flux":  # FluxParams grew fields over releases (txt_ids_dims: >= 0.4)
        import dataclasses

        from comfy.ldm.flux.model import FluxParams

        known = {f.name for f in dataclasses.fields(FluxParams)} | {"image_model"}
        unet_config = {k: v for k, v in unet_config.items() if k in known}
    mc = getattr(sm, name)(unet_config)
    mc.set_inference_dtype(torch.float32, None)
    return mc


def seed_weights(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> dict:
    """Seeded normal(0, std) weights (norm weights 1, biases 0), RoPE `inv_freq` buffers the usual
    geometric series (MiniMax H3 keeps its own in the checkpoint); returns the state dict."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in module.named_buffers():
            if name.endswith("inv_freq"):
                b.copy_(1.0 / 10000.0 ** (torch.arange(b.numel(), dtype=torch.float32) / b.numel()))
        for name, p in module.named_parameters():
            if p.dim() == 1 and ("norm" in name or name.endswith("scale")):
                p.fill_(1.0 if not name.endswith("bias") else 0.0)
            elif p.dim() == 1 and name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=g)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def build(family: str, seed: int = 0, tmp: Path | None = None):
    """A MODEL of `family` at reduced size (see module docstring)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    mc = _config(family)
    base = mc.get_model({}, "", device=torch.device("cpu"))
    sd = seed_weights(base.diffusion_model, seed, SPECS[family].std)
    if SPECS[family].detected and tmp is not None:  # through the file loader: detection sees the reduced model
        import comfy.sd
        import comfy.utils

        path = Path(tmp) / f"tiny_{family}_{seed}.safetensors"
        config = {k: v for k, v in SPECS[family].unet_config.items() if k != "image_model"}
        comfy.utils.save_torch_file(sd, str(path), metadata={"config": json.dumps({"transformer": config})} if SPECS[family].file_config else None)
        try:
            return comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
        except (ValueError, RuntimeError):  # ComfyUI < 0.33 fixes Flux's head count (and 0.3.64 its width) in detection: a width-128 model is not detectable there
            pass
    base.diffusion_model.load_state_dict(sd)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def conditioning(family: str, seed: int = 3):
    spec = SPECS[family]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        extra = {}
        for k, v in spec.extra_cond.items():
            extra[k] = torch.randn(v, generator=g) if isinstance(v, tuple) else v
        out.append([[torch.randn((1, 8, spec.context_dim), generator=g), extra]])
    return out[0], out[1]


def latent(family: str, size: int = 8) -> dict:
    spec = SPECS[family]
    video = torch.zeros(*spec.latent_shape[:-2], size, size)
    if spec.audio_shape is None:
        return {"samples": video}
    import comfy.nested_tensor

    return {"samples": comfy.nested_tensor.NestedTensor((video, torch.zeros(spec.audio_shape)))}


def flat(samples) -> torch.Tensor:
    """A sampled latent as one tensor (an audio+video NestedTensor: its streams flattened and joined)."""
    if getattr(samples, "is_nested", False):
        return torch.cat([t.flatten() for t in samples.unbind()])
    return samples


def sample(model, family: str, steps: int = 2, cfg: float = 1.0, seed: int = 42, size: int = 8) -> torch.Tensor:
    import nodes

    pos, neg = conditioning(family)
    with torch.inference_mode():
        out = nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", pos, neg, latent(family, size))
    return flat(out[0]["samples"]).clone()


__all__ = ["FAMILIES", "VARIANTS", "SPECS", "available", "build", "conditioning", "latent", "flat", "sample", "seed_weights"]
