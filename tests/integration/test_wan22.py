"""Wan 2.2 as users run it, under every SD Accel node, in a real ComfyUI (COMFYUI_PATH).

- **14B (T2V, I2V): two models.** A high-noise and a low-noise model, each from its own file through
  ComfyUI's loader (`comfy.sd.load_diffusion_model`, what Load Diffusion Model calls), sampled by two
  `KSamplerAdvanced` nodes that split the steps (the first `0..N/2` returning its leftover noise, the
  second `add_noise disable`, `N/2..end`), as ComfyUI's Wan 2.2 14B templates do. Compile Model,
  Step Cache, LoRA Hot-Swap and FP16 Cast on both.
- **TI2V 5B.** A reduced model ComfyUI's own detection calls Wan 2.2 5B (48 latent channels:
  `WAN22_T2V`, `model_base.WAN22`), with `Wan22ImageToVideoLatent`'s start image: the noise mask
  makes `WAN22.process_timestep` hand the model one timestep per frame (t of shape [B, T], a time
  modulation per token in every block).
- **Wan 2.1 I2V.** The image latent concatenated to the input and CLIP vision features (`clip_fea`) in
  the text context, from `WanImageToVideo`.

The reduced models keep what detection reads (head width 128, the 4096-wide T5 text, freq dim 256)
and shrink the rest (width 128, 2 blocks). No VAE weights exist here: `_VAE` stands in for the
VAE's `encode` in the image-to-video nodes, returning seeded latents of the shape the Wan VAEs
return. Dynamo's "eager" backend: tracing, guards and recompiles are what is tested, as in the
other CPU compile tests.
"""
from __future__ import annotations

import json

import pytest
import torch

import comfy_harness as harness
import dit_models
import dit_tiny

STEPS = 4  # split 2 + 2
CFG = 2.0
# Detection: num_heads = dim // 128, freq_dim 256, text_dim the default 4096; the rest is read from the shapes.
BASE = dict(patch_size=(1, 2, 2), dim=128, ffn_dim=256, freq_dim=256, text_dim=4096, num_heads=1, num_layers=2,
            qk_norm=True, cross_attn_norm=True, eps=1e-6)
VARIANTS = {  # name -> (WanModel arguments, latent channels, VAE downscale, latent frames)
    "t2v_14b": (dict(model_type="t2v", in_dim=16, out_dim=16), 16, 8, 2),
    "i2v_14b": (dict(model_type="t2v", in_dim=36, out_dim=16), 16, 8, 2),  # Wan 2.2 I2V 14B: the image latent + mask concatenated, no CLIP
    "i2v_21": (dict(model_type="i2v", in_dim=36, out_dim=16), 16, 8, 2),  # Wan 2.1 I2V: also CLIP vision features (img_emb)
    "ti2v_5b": (dict(model_type="t2v", in_dim=48, out_dim=48), 48, 16, 3),
}


class _VAE:
    """Stands in for a Wan VAE's `encode` in WanImageToVideo / Wan22ImageToVideoLatent: seeded latents of
    the shape the VAE returns for pixels [F, H, W, 3] (no VAE weights exist here; the VAE is not under test)."""

    def __init__(self, channels: int, down: int):
        self.channels, self.down = channels, down

    def encode(self, pixels):
        g = torch.Generator().manual_seed(11)
        frames = (pixels.shape[0] - 1) // 4 + 1
        return torch.randn((1, self.channels, frames, pixels.shape[1] // self.down, pixels.shape[2] // self.down), generator=g)


def _load(variant: str, seed: int, tmp):
    """A MODEL of `variant` with seeded weights, through a safetensors file and ComfyUI's loader."""
    import comfy.ops
    import comfy.sd
    import comfy.utils
    from comfy.ldm.wan.model import WanModel

    args, *_ = VARIANTS[variant]
    unet = WanModel(**BASE, **args, device="cpu", dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    sd = dit_models.seed_weights(unet, seed, std=0.05)
    path = tmp / f"wan_{variant}_{seed}.safetensors"
    comfy.utils.save_torch_file(sd, str(path))
    return comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("wan22")


@pytest.fixture(scope="module")
def pair(comfy_host, tmp):
    """variant -> (high-noise MODEL, low-noise MODEL), loaded once."""
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = (_load(variant, 1, tmp), _load(variant, 2, tmp))
        return cache[variant]

    return get


def _inputs(variant: str, frames_in_image: int = 1):
    """(positive, negative, latent dict) as a user's graph makes them for `variant` (the image nodes with a start image)."""
    import comfy.clip_vision
    from comfy_extras import nodes_wan

    _, channels, down, frames = VARIANTS[variant]
    g = torch.Generator().manual_seed(3)
    pos = [[torch.randn((1, 8, 4096), generator=g), {}]]
    neg = [[torch.randn((1, 8, 4096), generator=g), {}]]
    length, size = 4 * (frames - 1) + 1, 8 * down
    image = torch.rand((frames_in_image, size, size, 3), generator=g)
    vae = _VAE(channels, down)
    if variant == "t2v_14b":
        return pos, neg, {"samples": torch.zeros(1, channels, frames, 8, 8)}
    if variant == "ti2v_5b":
        out = nodes_wan.Wan22ImageToVideoLatent.execute(vae, size, size, length, 1, start_image=image)
        return pos, neg, (out[0] if isinstance(out, tuple) else out.result[0])
    clip = None
    if variant == "i2v_21":
        clip = comfy.clip_vision.Output()
        clip.penultimate_hidden_states = torch.randn((1, 257, 1280), generator=g)
    out = nodes_wan.WanImageToVideo.execute(pos, neg, vae, size, size, length, 1, start_image=image, clip_vision_output=clip)
    pos, neg, latent = out if isinstance(out, tuple) else out.result
    return pos, neg, latent


def _split(high, low, variant, steps=STEPS, cfg=CFG, sampler="euler", seed=42):
    """The Wan 2.2 14B templates' two KSamplerAdvanced nodes: high-noise 0..N/2 (leftover noise returned), low-noise N/2..end."""
    import nodes

    pos, neg, latent = _inputs(variant)
    ks, half = nodes.KSamplerAdvanced(), steps // 2
    with torch.inference_mode():
        mid = ks.sample(high, "enable", seed, steps, cfg, sampler, "simple", pos, neg, latent, 0, half, "enable")[0]
        out = ks.sample(low, "disable", seed, steps, cfg, sampler, "simple", pos, neg, mid, half, 10000, "disable")[0]
    return out["samples"].clone()


def _one(model, variant, steps=STEPS, cfg=CFG):
    """One KSampler run (the 5B and single-model I2V templates)."""
    import nodes

    pos, neg, latent = _inputs(variant)
    with torch.inference_mode():
        return nodes.common_ksampler(model, 42, steps, cfg, "euler", "simple", pos, neg, latent)[0]["samples"].clone()


def _counters():
    from torch._dynamo.utils import counters

    return counters


def _graphs() -> int:
    return int(_counters()["stats"]["unique_graphs"])


def _compile(comfy_adapter, accel, model):
    return comfy_adapter.apply_compile(model, accel.compile.CompileConfig(torch_backend="eager"))


def _fresh_dynamo():
    torch._dynamo.reset()
    _counters().clear()


# --- Wan 2.2 14B: two models, split steps ---------------------------------------------------------

@pytest.mark.parametrize("variant", ["t2v_14b", "i2v_14b"])
def test_14b_split_compile_equals_eager_and_the_low_noise_model_reuses_the_high_noise_graph(comfy_host, comfy_adapter, accel, pair, variant):
    """Compile Model on both models: the result equals eager; the two models' blocks are the same code with
    their parameters as graph inputs, so the low-noise model traces nothing the high-noise model did not;
    a second full run traces nothing."""
    high, low = pair(variant)
    ref = _split(high, low, variant)
    assert harness.rel_err(ref, _split(high, high, variant)) > 1e-3  # the two models differ
    _fresh_dynamo()
    ch, cl = _compile(comfy_adapter, accel, high), _compile(comfy_adapter, accel, low)
    out = _split(ch, cl, variant)
    assert harness.rel_err(out, ref) < 1e-5
    assert _graphs() == 1, f"{_graphs()} graphs: the low-noise model's blocks must reuse the high-noise model's compiled block"
    assert not _counters()["recompiles"], dict(_counters()["recompiles"])
    assert torch.equal(_split(ch, cl, variant), out)
    assert _graphs() == 1 and not _counters()["recompiles"], "the second run compiled again"
    for m in (ch, cl):
        assert comfy_adapter.compile_report(m)["status"] == "compiled"
