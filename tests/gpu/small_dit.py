"""Small models of the real ComfyUI classes, a procedural data set, and the file format they are kept in.

Shared by `train_small_dit.py` (trains one), `judge_caches.py` (samples it with each step cache)
and the CPU tests. Needs a ComfyUI tree on sys.path (`boot(root)` puts it there).

A family here is: the ComfyUI supported-model class that owns the architecture, a reduced
`unet_config` of the real diffusion-model class (same block types, narrower and shallower),
and the latent shape it samples. The file is the diffusion model's own state dict (the keys
ComfyUI's `load_diffusion_model` reads) with the family and config in the safetensors
metadata. Where ComfyUI's shape detection cannot recover a reduced config (it hard-codes the
full-size widths of Qwen-Image and Z-Image), `load_model` builds the same supported-model
class from the metadata instead; `DETECTED` says which families load through detection.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

CLASSES = ("circle", "square", "ring", "stripes_h", "stripes_v", "checker", "gradient", "blobs")
CTX_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class Spec:
    supported: str  # comfy.supported_models class
    model_class: str  # type(model.model).__name__ ComfyUI must give back
    config: dict  # unet_config (filtered to what the host's class accepts)
    channels: int  # latent channels
    ctx_dim: int  # conditioning width
    frames: int = 0  # > 0: a 5-D latent (B, C, T, H, W) (Qwen-Image's is too, with T = 1)
    detected: bool = True  # comfy.sd.load_diffusion_model recognises the reduced config
    pooled: int = 0  # width of a pooled text vector (Flux's vector_in; older hosts require one)


SPECS = {
    # Flux.1 schnell layout (no guidance embedding, so CFG drives the conditioning); hidden 384 = 3 heads of 128.
    "flux": Spec("FluxSchnell", "Flux", dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=64, context_in_dim=64, hidden_size=384,
        mlp_ratio=4.0, num_heads=3, depth=2, depth_single_blocks=4, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
        qkv_bias=True, guidance_embed=False, txt_ids_dims=[]), 16, 64, pooled=64),
    # Qwen-Image: detection reads only in_channels and the depth (width 3072 is hard-coded).
    "qwen": Spec("QwenImage", "QwenImage", dict(
        image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=5, attention_head_dim=128,
        num_attention_heads=3, joint_attention_dim=64, axes_dims_rope=(16, 56, 56)), 16, 64, frames=1, detected=False),
    # Z-Image (NextDiT): detection sets its head count, RoPE and modulation only for dim 3840.
    "zimage": Spec("ZImage", "Lumina2", dict(
        image_model="lumina2", patch_size=2, in_channels=16, dim=384, n_layers=5, n_refiner_layers=1, n_heads=3,
        n_kv_heads=3, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0,
        ffn_dim_multiplier=8.0 / 3.0, qk_norm=True, cap_feat_dim=64, z_image_modulation=True, time_scale=1000.0,
        vid_out_norm=True), 16, 64, detected=False),
    # Wan 2.1 T2V: detection derives heads (dim // 128), ffn and depth; text_dim stays the real 4096.
    "wan": Spec("WAN21_T2V", "WAN21", dict(
        image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=256, ffn_dim=1024, freq_dim=256,
        text_dim=4096, out_dim=16, num_heads=2, num_layers=5, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True,
        eps=1e-6), 16, 4096, frames=3),
    # SD1.5: detection keys on model_channels 320 / context 768, so depth is reduced, not width.
    "sd15": Spec("SD15", "BaseModel", dict(
        use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
        adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[1, 1], transformer_depth=[1, 1],
        channel_mult=[1, 2], transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768, num_heads=8,
        transformer_depth_output=[1, 1, 1, 1], use_temporal_attention=False, use_temporal_resblock=False), 4, 768),
}
# Smoke: the same classes, as small as they go (CPU, seconds).
SMOKE = {
    "flux": dict(hidden_size=128, num_heads=1, depth=1, depth_single_blocks=2, context_in_dim=32, vec_in_dim=32),
    "qwen": dict(num_layers=2, num_attention_heads=1, joint_attention_dim=32),
    "zimage": dict(dim=256, n_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=32),
    "wan": dict(dim=128, ffn_dim=256, num_heads=1, num_layers=2),
    "sd15": {},
}
SMOKE_CTX = {"flux": 32, "qwen": 32, "zimage": 32, "wan": 4096, "sd15": 768}


def boot(comfyui: str | Path, cpu: bool = False):
    """Put the ComfyUI tree on sys.path and import its model code (CPU when asked or when there is no GPU)."""
    root = str(Path(comfyui).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    stubs = Path(root) / "_cpu_stubs"
    if not stubs.is_dir():  # a trimmed tree on the GPU machine: PyAV (video only) is absent there
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import comfy_dynamic_vram

        comfy_dynamic_vram.av_stand_in()
    from comfy.cli_args import args

    if cpu or not torch.cuda.is_available():
        args.cpu = True  # read once, when comfy.model_management is imported
    import comfy.model_management  # noqa: F401
    if stubs.is_dir() and str(stubs) not in sys.path:
        sys.path.append(str(stubs))


def spec_for(family: str, smoke: bool = False) -> Spec:
    if family not in SPECS:
        raise SystemExit(f"unknown family {family!r}: expected one of {', '.join(SPECS)}")
    s = SPECS[family]
    if smoke:
        s = dataclasses.replace(s, config=dict(s.config, **SMOKE[family]), ctx_dim=SMOKE_CTX[family], pooled=32 if s.pooled else 0)
    return s


def _accepted(family: str, config: dict) -> dict:
    """`config` less the keys this host's class does not take (Flux grew fields over releases)."""
    if family == "flux":
        import comfy.ldm.flux.model as fm

        names = set(fm.FluxParams.__dataclass_fields__) | {"image_model"}
        return {k: v for k, v in config.items() if k in names}
    return dict(config)


def build(family: str, smoke: bool = False, seed: int = 0, device="cpu", **overrides):
    """A ComfyUI BaseModel of the family's real class with seeded weights (fp32); `overrides` change the config."""
    import comfy.supported_models

    s = spec_for(family, smoke)
    if overrides:
        s = dataclasses.replace(s, config=dict(s.config, **overrides))
    cfg = _accepted(family, s.config)
    if not hasattr(comfy.supported_models, s.supported):
        raise SystemExit(f"this ComfyUI has no {s.supported} (family {family}); use a newer tree")
    mc = getattr(comfy.supported_models, s.supported)(dict(cfg))
    mc.set_inference_dtype(torch.float32, None)
    base = mc.get_model({}, "", device=torch.device(device))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in base.diffusion_model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                p.zero_()
            elif p.ndim == 1:  # norm scales (weight / scale)
                p.fill_(1.0)
            else:
                fan_in = p[0].numel() if p.ndim >= 2 else 1
                p.copy_(torch.randn(p.shape, generator=g) * min(0.02, 1.0 / math.sqrt(fan_in)))
    return base, s, cfg


def latent_shape(s: Spec, batch: int, size: int) -> tuple:
    return (batch, s.channels, s.frames, size, size) if s.frames else (batch, s.channels, size, size)


# --- procedural data --------------------------------------------------------------------------

def class_embeddings(s: Spec, seed: int = 1234) -> torch.Tensor:
    """(classes + 1, CTX_TOKENS, ctx_dim): one seeded embedding per class; the last row (zeros) is the uncond."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn((len(CLASSES), CTX_TOKENS, s.ctx_dim), generator=g)
    return torch.cat([e, torch.zeros((1, CTX_TOKENS, s.ctx_dim))])


def class_pooled(s: Spec, seed: int = 4321) -> torch.Tensor | None:
    """(classes + 1, pooled): the pooled vector per class (zeros for the uncond), or None."""
    if not s.pooled:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn((len(CLASSES), s.pooled), generator=g), torch.zeros((1, s.pooled))])


def _mask(kind: str, yy, xx, g: torch.Generator):
    r = lambda a, b: a + (b - a) * float(torch.rand((), generator=g))  # noqa: E731
    cy, cx, rad = r(-0.4, 0.4), r(-0.4, 0.4), r(0.2, 0.5)
    d = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
    if kind == "circle":
        return (d < rad).float()
    if kind == "square":
        return (((yy - cy).abs() < rad) & ((xx - cx).abs() < rad)).float()
    if kind == "ring":
        return ((d < rad) & (d > rad * 0.6)).float()
    if kind == "stripes_h":
        return (torch.sin(yy * r(6, 14) + r(0, 6.3)) > 0).float()
    if kind == "stripes_v":
        return (torch.sin(xx * r(6, 14) + r(0, 6.3)) > 0).float()
    if kind == "checker":
        f = r(4, 9)
        return ((torch.sin(yy * f) * torch.sin(xx * f)) > 0).float()
    if kind == "gradient":
        a = r(0, 6.3)
        return ((yy * math.sin(a) + xx * math.cos(a)) * 0.5 + 0.5).clamp(0, 1)
    m = torch.zeros_like(yy)  # blobs
    for _ in range(4):
        by, bx, bs = r(-0.8, 0.8), r(-0.8, 0.8), r(0.05, 0.2)
        m = m + torch.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / bs)
    return m.clamp(0, 1)


def sample_batch(s: Spec, batch: int, size: int, g: torch.Generator):
    """Latents (model space, about unit variance) and their class ids, drawn from seeded generator `g`."""
    ys = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(ys, ys, indexing="ij")
    labels = torch.randint(0, len(CLASSES), (batch,), generator=g)
    frames = max(s.frames, 1)
    out = torch.empty((batch, s.channels, frames, size, size))
    for b in range(batch):
        fg, bg = torch.randn(s.channels, generator=g), torch.randn(s.channels, generator=g) * 0.5
        shift = int(torch.randint(-2, 3, (), generator=g))
        m = _mask(CLASSES[int(labels[b])], yy, xx, g)
        for t in range(frames):  # video: the pattern drifts a few latent pixels a frame
            mt = torch.roll(m, shifts=t * shift, dims=1)
            out[b, :, t] = bg[:, None, None] + (fg - bg)[:, None, None] * mt
    out = out + 0.05 * torch.randn(out.shape, generator=g)
    return (out if s.frames else out[:, :, 0]), labels


# --- files ------------------------------------------------------------------------------------

def save(base, family: str, cfg: dict, path: Path, extra: dict | None = None):
    import comfy.utils

    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in base.diffusion_model.state_dict().items()}
    meta = {"sdaccel_family": family, "sdaccel_config": json.dumps(cfg, default=list)}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    comfy.utils.save_torch_file(sd, str(path), metadata=meta)


def read_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def spec_of_file(path: Path) -> Spec:
    meta = read_meta(path)
    return spec_for(meta["sdaccel_family"], smoke=json.loads(meta.get("sdaccel_train", "{}")).get("smoke", False))


def load_model(path: Path):
    """(ModelPatcher, how): through `comfy.sd.load_diffusion_model` where detection knows the reduced
    family, else the family's supported-model class built from the file's metadata."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    meta = read_meta(path)
    family = meta["sdaccel_family"]
    s = SPECS[family]
    cfg = json.loads(meta["sdaccel_config"])
    if s.detected:
        try:
            m = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
            why = f"detected {type(m.model).__name__}, expected {s.model_class}"
            if type(m.model).__name__ == s.model_class and _detected_matches(m, cfg):
                return m, "load_diffusion_model"
            if type(m.model).__name__ == s.model_class:
                why = "detection filled in other widths"
        except Exception as e:  # older hosts hard-code widths (0.8.0: Flux's 24 heads)
            why = f"{type(e).__name__}: {e}"
        print(f"small_dit: this ComfyUI's detection does not load the reduced {family} ({why}); building {s.supported} from the file's config", file=sys.stderr)
    mc = getattr(comfy.supported_models, s.supported)(_accepted(family, cfg))  # a file from a newer host: its extra fields dropped
    mc.set_inference_dtype(torch.float32, None)
    base = mc.get_model({}, "", device=torch.device("cpu"))
    sd = _norm_names(comfy.utils.load_torch_file(str(path)), base.diffusion_model.state_dict().keys())
    base.diffusion_model.load_state_dict(sd, strict=True)
    if type(base).__name__ != s.model_class:
        raise RuntimeError(f"{path}: built {type(base).__name__}, expected {s.model_class}")
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()), "supported_models." + s.supported


def _norm_names(sd: dict, wanted) -> dict:
    """Norm scales under the names this host's class uses: 0.33's Flux RMSNorm holds `weight` where
    0.3.64's holds `scale` (a file trained on one host, judged on the other)."""
    wanted = set(wanted)
    other = {".weight": ".scale", ".scale": ".weight"}
    out = {}
    for k, v in sd.items():
        end = next((e for e in other if k.endswith(e)), None)
        alt = k[: -len(end)] + other[end] if end and k not in wanted else None
        out[alt if alt in wanted else k] = v
    return out


def _detected_matches(m, cfg: dict) -> bool:
    got = getattr(m.model, "model_config", None)
    uc = getattr(got, "unet_config", {}) or {}
    return all(uc.get(k) == v for k, v in cfg.items() if k in uc and isinstance(v, (int, float, str)) and not isinstance(v, bool))


def conds(s: Spec, labels, device="cpu"):
    """ComfyUI positive/negative lists for class ids `labels` (negative: the zero embedding)."""
    emb, pooled = class_embeddings(s), class_pooled(s)
    idx = torch.as_tensor(labels)
    pos = emb[idx]
    neg = emb[-1:].expand(len(labels), -1, -1)
    pe = {"pooled_output": pooled[idx].to(device)} if pooled is not None else {}
    ne = {"pooled_output": pooled[-1:].expand(len(labels), -1).contiguous().to(device)} if pooled is not None else {}
    return [[pos.to(device), pe]], [[neg.contiguous().to(device), ne]]


__all__ = ["SPECS", "Spec", "boot", "spec_for", "build", "latent_shape", "class_embeddings", "sample_batch", "save",
           "load_model", "read_meta", "conds", "CLASSES", "class_pooled", "spec_of_file"]
