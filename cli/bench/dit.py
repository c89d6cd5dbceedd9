"""The DiT families for `sd-accel bench --host comfy`: ComfyUI's own model classes with seeded random weights.

Full size (flux-1024, qwen-image-1328, zimage-1024, wan-480p, ltx-768x512): the family's ComfyUI model config
(`comfy.supported_models`) with the released checkpoint's configuration builds the model on the
device in bf16, every parameter is filled from a seeded generator, the state dict is written as
safetensors (once; the file is kept in the temp folder for the next run) and loaded back with
`comfy.sd.load_diffusion_model`, as a user's UNETLoader does, so ComfyUI's detection, dtype choice
and DynamicVRAM apply. The writer builds with plain torch layers: under DynamicVRAM ComfyUI's own
layers keep weights lazy and their state_dict leaves them out (152 of Flux's 780 tensors).

Reduced size (the -tiny presets, for the CPU and tests): the same classes at small width and depth,
in fp32, written to a per-process temp folder. They go through the loader too where ComfyUI's
detection recognises the reduced shapes (Flux on 0.33); detection fixes other families' widths, so
those are built from the model config directly, with the same weights.

`tests/gpu/dit_families.py` builds its models with this module.
"""
from __future__ import annotations

import atexit
import dataclasses
import gc
import importlib
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch

from ...accel_core.errors import SDAccelError
from ...accel_core.log import logger

GB = 1024 ** 3


@dataclass(frozen=True)
class DitSpec:
    configs: tuple[str, ...]  # comfy.supported_models class names, the first one this ComfyUI has wins
    unet: dict  # the model config's unet_config (as ComfyUI's detection writes it for the released file)
    context: tuple[int, int]  # text tokens, text width
    latent: tuple  # the latent at the preset's size
    extra: dict = field(default_factory=dict)  # conditioning extras: a tuple is a random tensor of that shape
    std: float = 0.02  # weights ~ N(0, std); norm scales 1, biases 0
    text_mask: bool = False  # the conditioning carries the text's attention mask (Lumina 2 on 0.3.64 reads its length; LTX-Video requires it)
    audio: tuple | None = None  # an audio+video model: the latent is ComfyUI's NestedTensor (video `latent`, audio of this shape)
    file_config: bool = False  # the file carries its config in its metadata, as LTX-2's released files do (detection reads it)


FULL = {
    "flux": DitSpec(("Flux",), dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                                     mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000,
                                     patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[]),
                    (512, 4096), (1, 16, 128, 128), {"pooled_output": (1, 768), "guidance": 3.5}),
    "qwen_image": DitSpec(("QwenImage",), dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=60),
                          (256, 3584), (1, 16, 1, 166, 166)),
    "zimage": DitSpec(("ZImage",), dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30,
                                        n_kv_heads=30, multiple_of=256, ffn_dim_multiplier=8.0 / 3.0, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                                        axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0, z_image_modulation=True,
                                        time_scale=1000.0, pad_tokens_multiple=32),
                      (256, 2560), (1, 16, 128, 128), text_mask=True),
    # Wan 2.2 TI2V 5B (48-channel latent, 16x spatial / 4x temporal): 832x480, 33 frames -> 9 x 30 x 52
    "wan": DitSpec(("WAN22_T2V",), dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=48, dim=3072,
                                        ffn_dim=14336, freq_dim=256, text_dim=4096, out_dim=48, num_heads=24, num_layers=30),
                   (512, 4096), (1, 48, 9, 30, 52)),
    # LTX-Video 2B 0.9.x (128-channel latent, 32x spatial / 8x temporal): 768x512, 97 frames -> 13 x 16 x 24; T5-XXL text.
    # ComfyUI's detection reads the depth, head width (32 heads) and text width; the rest are the class defaults.
    "ltx": DitSpec(("LTXV",), dict(image_model="ltxv", in_channels=128, num_attention_heads=32, attention_head_dim=64, cross_attention_dim=2048,
                                   caption_channels=4096, num_layers=28),
                   (128, 4096), (1, 128, 13, 16, 24), text_mask=True),
}

TINY = {
    "flux": DitSpec(("Flux",), dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=128,
                                     mlp_ratio=4.0, num_heads=1, depth=2, depth_single_blocks=3, axes_dim=[16, 56, 56], theta=10000,
                                     patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[]),
                    (8, 64), (1, 16, 8, 8), {"pooled_output": (1, 32), "guidance": 3.5}, std=0.05),
    "qwen_image": DitSpec(("QwenImage",), dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=3, attention_head_dim=128,
                                               num_attention_heads=1, joint_attention_dim=48),
                          (8, 48), (1, 16, 1, 8, 8), std=0.05),
    "zimage": DitSpec(("ZImage", "Lumina2"), dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, n_layers=3, n_refiner_layers=1,
                                                  n_heads=8, n_kv_heads=8, multiple_of=16, ffn_dim_multiplier=8.0 / 3.0, norm_eps=1e-5, qk_norm=True,
                                                  cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[64, 64, 64], rope_theta=256.0,
                                                  z_image_modulation=True, time_scale=1000.0),
                      (8, 32), (1, 16, 8, 8), std=0.05, text_mask=True),
    "wan": DitSpec(("WAN21_T2V",), dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=64, ffn_dim=128,
                                        freq_dim=32, text_dim=48, out_dim=16, num_heads=2, num_layers=3),
                   (8, 48), (1, 16, 1, 8, 8), std=0.05),
    "ltx": DitSpec(("LTXV",), dict(image_model="ltxv", in_channels=128, num_attention_heads=32, attention_head_dim=2, cross_attention_dim=64,
                                   caption_channels=4096, num_layers=2),
                   (8, 4096), (1, 128, 2, 8, 8), std=0.05, text_mask=True),
    # MiniMax H3 (0.33+): no full-size preset: the class defaults (hidden 5376, 50 blocks, full-width adaln) are 33.1B
    # parameters, a 66 GB bf16 file, more than the GPU machines' disk holds next to the rest; the curve-form
    # checkpoints are smaller, but their curve basis size is read from the file and not known here.
    "minimax": DitSpec(("MiniMaxH3",), dict(image_model="minimax_h3", hidden_size=64, num_layers=3, token_refiner_num_layers=1,
                                            num_attention_heads=2, attention_head_dim=32, ffn_hidden_size=128, latents_dim=24,
                                            audio_latents_dim=32, text_dim=32, timestep_input_dim=32, time_embed_hidden_size=64,
                                            time_embed_dim=32, rope_inv_freq_len=4),
                       (8, 32), (1, 24, 2, 8, 8), std=0.1, audio=(1, 32, 2, 4)),
    # LTX-2 (0.8.0+): detection fixes the audio widths (a ~867M-parameter audio half) unless the file's metadata carries
    # the transformer config, as the released files do; this one does. The text: the video and audio halves side by side.
    "ltx2": DitSpec(("LTXAV",), dict(image_model="ltxav", in_channels=128, audio_in_channels=128, num_attention_heads=2, attention_head_dim=16,
                                     cross_attention_dim=32, audio_num_attention_heads=2, audio_attention_head_dim=16,
                                     audio_cross_attention_dim=32, caption_channels=32, num_layers=3, connector_attention_head_dim=16,
                                     connector_num_attention_heads=2, connector_num_layers=1),
                    (8, 64), (1, 128, 2, 8, 8), std=0.05, text_mask=True, audio=(1, 8, 4, 16), file_config=True),
}

_CLASSES = {"flux": ("comfy.ldm.flux.model", "Flux", "FluxParams"), "qwen_image": ("comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel", None),
            "zimage": ("comfy.ldm.lumina.model", "NextDiT", None), "wan": ("comfy.ldm.wan.model", "WanModel", None),
            "ltx": ("comfy.ldm.lightricks.model", "LTXVModel", None), "ltx2": ("comfy.ldm.lightricks.av_model", "LTXAVModel", None),
            "minimax": ("comfy.ldm.minimax.model", "MiniMaxH3Model", None)}


def spec(family: str, tiny: bool) -> DitSpec:
    return (TINY if tiny else FULL)[family]


def config_name(family: str, tiny: bool) -> str:
    """The model config class this ComfyUI has for the family, or a clear refusal."""
    import comfy.supported_models as sm

    s = spec(family, tiny)
    name = next((n for n in s.configs if hasattr(sm, n)), None)
    if name is None:
        raise SDAccelError(f"SD Accel bench: this ComfyUI has no {' / '.join(s.configs)} model config, so it cannot run {family}; "
                           "the family is newer than this ComfyUI. Update ComfyUI, or pick another --preset.")
    return name


def _accepted(family: str, cfg: dict) -> dict:
    """The keys of `cfg` this ComfyUI's model class takes (older ones lack e.g. Flux's txt_ids_dims, NextDiT's rope_theta)."""
    mod_name, cls_name, params_name = _CLASSES[family]
    mod = importlib.import_module(mod_name)
    params = inspect.signature(getattr(mod, cls_name).__init__).parameters
    if params_name and hasattr(mod, params_name):  # Flux hands **kwargs to its params dataclass
        names = set(params) | {f.name for f in dataclasses.fields(getattr(mod, params_name))}
    elif any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return cfg
    else:
        names = set(params)
    return {k: v for k, v in cfg.items() if k in names or k == "image_model"}


def model_config(family: str, tiny: bool, dtype: torch.dtype):
    import comfy.supported_models as sm

    name = config_name(family, tiny)
    cfg = dict(spec(family, tiny).unet)
    if name == "Lumina2":  # Lumina 2 is NextDiT without Z-Image's modulation (hosts before Z-Image)
        cfg = {k: v for k, v in cfg.items() if k not in ("z_image_modulation", "time_scale", "pad_tokens_multiple")}
    mc = getattr(sm, name)(_accepted(family, cfg))
    mc.set_inference_dtype(dtype, None)
    return mc


class PlainOps:
    """Plain torch layers in the model config's `custom_operations` slot, for writing the file (see the module doc)."""

    Linear, Conv1d, Conv2d, Conv3d = torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d
    ConvTranspose2d, GroupNorm, LayerNorm, Embedding = torch.nn.ConvTranspose2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.Embedding
    RMSNorm = getattr(torch.nn, "RMSNorm", None)

    @staticmethod
    def conv_nd(dims, *args, **kwargs):
        return {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dims](*args, **kwargs)


def seed_weights(module: torch.nn.Module, seed: int, std: float):
    """Seeded N(0, std) matrices, norm scales 1, biases 0 (generated on the module's device; none on "meta")."""
    dev = next(module.parameters()).device
    if dev.type == "meta":  # shapes only (tests check what ComfyUI's detection makes of the full-size file)
        return
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and ("norm" in name or name.endswith("scale")) and not name.endswith("bias"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, std, generator=g)


def build_weights(family: str, tiny: bool, seed: int, device: str) -> dict[str, torch.Tensor]:
    """The state dict of the family's ComfyUI class with seeded random weights (bf16 full size, fp32 tiny; shapes only on "meta")."""
    dtype = torch.float32 if tiny else torch.bfloat16
    mc = model_config(family, tiny, dtype)
    mc.custom_operations = PlainOps
    dev = torch.device(device)
    with torch.device(dev):
        dm = mc.get_model({}, "", device=dev).diffusion_model
    seed_weights(dm, seed, spec(family, tiny).std)
    sd = {k: v.detach().contiguous() for k, v in dm.state_dict().items()}  # the class's own dtypes (Wan keeps fp32 parts)
    n_params = sum(1 for _ in dm.named_parameters())
    if len(sd) < n_params:
        raise SDAccelError(f"SD Accel bench: the {family} state dict has {len(sd)} tensors for {n_params} parameters (lazy layers left out); "
                           "expected every weight. Report this with your ComfyUI version.")
    return sd


_tiny_dir: str | None = None


def _tiny_folder() -> str:
    global _tiny_dir
    if _tiny_dir is None:
        _tiny_dir = tempfile.mkdtemp(prefix="sd_accel_bench_dit_")
        atexit.register(shutil.rmtree, _tiny_dir, True)
    return _tiny_dir


def model_file(family: str, tiny: bool, seed: int, device: str) -> str:
    """The safetensors file of the family's seeded model: full size kept in the temp folder (written once), tiny per process."""
    import comfy.utils

    folder = _tiny_folder() if tiny else tempfile.gettempdir()
    path = os.path.join(folder, f"sd_accel_bench_{family}{'_tiny' if tiny else ''}_{seed}.safetensors")
    if os.path.exists(path):
        return path
    sd = build_weights(family, tiny, seed, device)
    size = sum(t.numel() * t.element_size() for t in sd.values())
    free = shutil.disk_usage(folder).free
    if size * 1.02 > free:
        others = [f for f in os.listdir(folder) if f.startswith("sd_accel_bench_") and f.endswith(".safetensors")]
        del sd
        raise SDAccelError(f"SD Accel bench: the {family} model file needs {size / GB:.1f} GB, and {folder} has {free / GB:.1f} GB free. "
                           f"Free some space{' (earlier bench models there: ' + ', '.join(others) + ')' if others else ''}, then run again.")
    if not tiny:
        logger.info("SD Accel bench: writing %s (%.1f GB, seeded random weights; kept for the next run)", path, size / GB)
    s = spec(family, tiny)
    config = {k: v for k, v in s.unet.items() if k != "image_model"}
    comfy.utils.save_torch_file(sd, path + ".part", metadata={"config": json.dumps({"transformer": config})} if s.file_config else None)
    os.replace(path + ".part", path)
    del sd
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def lora_file(model_path: str, folder: str, name: str, seed: int, rank: int = 32, std: float = 0.01) -> str:
    """A seeded random LoRA over every 2-D weight of a model file, in ComfyUI's own names
    (`diffusion_model.<module>.lora_up/down.weight`, which LoraLoader and LoRA Hot-Swap both take).
    The shapes come from the file's header, so no weights are read; speed does not depend on the values."""
    import comfy.utils
    from safetensors import safe_open

    g, sd = torch.Generator().manual_seed(seed), {}
    with safe_open(model_path, framework="pt") as f:
        for k in f.keys():
            shape = f.get_slice(k).get_shape()
            r = min(rank, *shape) if len(shape) == 2 else 0  # the reduced models have layers narrower than `rank`
            if k.endswith(".weight") and r >= 2:
                module = "diffusion_model." + k[: -len(".weight")]
                sd[f"{module}.lora_down.weight"] = (torch.randn((r, shape[1]), generator=g) * std).to(torch.bfloat16)
                sd[f"{module}.lora_up.weight"] = (torch.randn((shape[0], r), generator=g) * std).to(torch.bfloat16)
                sd[f"{module}.alpha"] = torch.tensor(float(r))
    path = os.path.join(folder, name)
    comfy.utils.save_torch_file(sd, path)
    return path


def load_model(family: str, tiny: bool, seed: int, device: str):
    """(MODEL, how it was loaded) for the family at the preset's size (see the module doc)."""
    import comfy.sd

    path = model_file(family, tiny, seed, device)
    want = config_name(family, tiny)
    opts = {"dtype": torch.float32} if tiny else {}
    try:
        model = comfy.sd.load_diffusion_model(path, model_options=opts)
        got = type(model.model.model_config).__name__
        if got != want:
            raise SDAccelError(f"ComfyUI detected {got}, not {want}")
        if tiny:
            _check_shapes(model, path)
        return model, f"{want} from {os.path.basename(path)} (comfy.sd.load_diffusion_model)"
    except Exception as e:  # noqa: BLE001  (tiny: detection fixes widths a reduced model does not have)
        if not tiny:
            raise SDAccelError(f"SD Accel bench: ComfyUI did not load the generated {family} model {path} as {want} "
                               f"({type(e).__name__}: {str(e)[:200]}); this ComfyUI's detection differs from what the bench expects. "
                               "Report it with your ComfyUI version.") from e
    return _build_direct(family, path), f"{want} built from its model config (ComfyUI's detection fixes this family's widths)"


def _check_shapes(model, path: str):
    import comfy.utils

    want = {k: tuple(v.shape) for k, v in comfy.utils.load_torch_file(path).items()}
    got = {k: tuple(v.shape) for k, v in model.model.diffusion_model.state_dict().items()}
    if want != got:
        raise SDAccelError("the loaded model's shapes differ from the file's")


def _build_direct(family: str, path: str):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    mc = model_config(family, True, torch.float32)
    base = mc.get_model({}, "", device=torch.device("cpu"))
    base.diffusion_model.load_state_dict(comfy.utils.load_torch_file(path))
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def conditioning(family: str, tiny: bool, g: torch.Generator) -> list:
    s = spec(family, tiny)
    n, width = s.context
    extra = {k: torch.randn(v, generator=g) if isinstance(v, tuple) else v for k, v in s.extra.items()}
    if s.text_mask:
        extra["attention_mask"] = torch.ones(1, n, dtype=torch.long)
    return [[torch.randn((1, n, width), generator=g), extra]]


def latent(family: str, tiny: bool):
    s = spec(family, tiny)
    if s.audio is None:
        return torch.zeros(s.latent)
    import comfy.nested_tensor

    return comfy.nested_tensor.NestedTensor((torch.zeros(s.latent), torch.zeros(s.audio)))


def flat(samples) -> torch.Tensor:
    """A sampled latent as one tensor (an audio+video NestedTensor: its streams flattened and joined)."""
    if getattr(samples, "is_nested", False):
        return torch.cat([t.flatten() for t in samples.unbind()])
    return samples


__all__ = ["FULL", "TINY", "DitSpec", "spec", "config_name", "model_config", "build_weights", "model_file", "load_model", "conditioning",
           "latent", "flat", "seed_weights"]
