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


def missing(variant: str) -> str | None:
    """Why this ComfyUI cannot run `variant` (probed: its Wan class, model configs and nodes), or None."""
    import importlib

    need = [("comfy.ldm.wan.model", "WanModel"), ("comfy_extras.nodes_wan", "WanImageToVideo")]
    if variant == "ti2v_5b":
        need += [("comfy.model_base", "WAN22"), ("comfy.supported_models", "WAN22_T2V"), ("comfy_extras.nodes_wan", "Wan22ImageToVideoLatent")]
    for mod, name in need:
        try:
            if hasattr(importlib.import_module(mod), name):
                continue
        except ImportError:
            pass
        return f"this ComfyUI has no {mod}.{name} (Wan 2.2 support is newer)"
    return None


@pytest.fixture(scope="module")
def pair(comfy_host, tmp):
    """variant -> (high-noise MODEL, low-noise MODEL), loaded once (skips where the host lacks the variant)."""
    cache = {}

    def get(variant):
        if missing(variant):
            pytest.skip(missing(variant))
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


def _recorder(model):
    """A clone of `model` whose model calls are recorded (input, timestep, conds, output): harness.record_calls."""
    m = model.clone()
    return m, harness.record_calls(m)


def test_14b_split_step_cache_runs_each_stage_on_its_own_with_the_window_over_the_whole_schedule(comfy_host, pair, stepcache_stats):
    """Step Cache on both models: each KSamplerAdvanced is its own sampling run. Each stage's first call runs
    every block (nothing kept from the high-noise model reaches the low-noise one), the schedule caches where
    expected, the result stays near eager. start/end are points of the whole denoising: a window of
    0.5..1 caches in the low-noise stage only, 0..0.5 in the high-noise stage only."""
    high, low = pair("t2v_14b")
    steps = 8  # 4 + 4
    ref = _split(high, low, "t2v_14b", steps=steps)
    sc = {}
    for window in ((0.0, 1.0), (0.5, 1.0), (0.0, 0.5)):
        rh, calls_h = _recorder(harness.step_cache(comfy_host, high, interval=2, start=window[0], end=window[1]))
        rl, calls_l = _recorder(harness.step_cache(comfy_host, low, interval=2, start=window[0], end=window[1]))
        out = _split(rh, rl, "t2v_14b", steps=steps)
        hi, lo = stepcache_stats[-2:]
        assert (hi["span"], lo["span"]) == ([0.0, 0.5], [0.5, 1.0])  # where each stage lies in the whole schedule
        assert hi["calls"] == lo["calls"] == 4  # cond and uncond batched: one call per step
        sc[window] = (hi["cached_steps"], lo["cached_steps"], harness.rel_err(out, ref))
        for m, calls, stats in ((rh, calls_h, hi), (rl, calls_l, lo)):  # full calls (each stage's first) are the model's own, bit for bit
            with torch.inference_mode():
                for step, (x, t, c, o) in enumerate(calls):
                    assert torch.equal(m.model.apply_model(x, t, **c), o) == (step not in stats["cached_steps"]), (window, step)
    assert sc[(0.0, 1.0)][:2] == ([1, 3], [1, 3]), sc
    assert sc[(0.5, 1.0)][:2] == ([], [1, 3]), sc
    assert sc[(0.0, 0.5)][:2] == ([1, 3], []), sc
    for window, (_, _, err) in sc.items():
        assert 0 < err < 0.1, (window, err)  # 0.015, 0.015, 0.0008 on 0.33 (random weights)
    assert sc[(0.0, 0.5)][2] < sc[(0.0, 1.0)][2] and sc[(0.5, 1.0)][2] <= 1.01 * sc[(0.0, 1.0)][2]


# lightx2v's Wan 2.2 A14B 4-step LoRAs, one per model, as ComfyUI's templates name them
LIGHTX2V = {"high": "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors", "low": "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors"}


@pytest.fixture(scope="module")
def loras(comfy_host, pair, tmp):
    """The two lightx2v-format LoRAs (different seeds) and a kohya one, in a tmp folder ComfyUI's LoraLoader lists."""
    import folder_paths
    from safetensors.torch import save_file

    high, _ = pair("t2v_14b")
    folder = tmp / "loras"
    folder.mkdir(exist_ok=True)
    names = dict(LIGHTX2V, style="wan_style_kohya.safetensors")
    for (key, name), (fmt, seed) in zip(names.items(), (("lightx2v", 1), ("lightx2v", 2), ("kohya", 3))):
        save_file(dit_tiny.make_lora(high, "wan", fmt, seed=seed, rank=4), str(folder / name))
    folder_paths.add_model_folder_path("loras", str(folder))
    return folder, names


def _loraloader(model, folder, name, strength):
    import comfy.sd
    import comfy.utils

    return comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(folder / name), safe_load=True), strength, 0)[0]


def test_14b_split_hotswap_on_both_compiled_models_equals_loraloader_without_recompiles(comfy_host, comfy_adapter, accel, pair, loras,
                                                                                      stepcache_stats):
    """LoRA Hot-Swap on both compiled models, each its own lightx2v LoRA, sampled as the lightx2v templates do
    (4 steps split 2 + 2, CFG 1): equal to ComfyUI's LoraLoader on each; then the whole stack (Compile Model ->
    Step Cache -> LoRA Hot-Swap on both) with the high model's LoRA swapped and the low's re-weighted, equal to
    the Step Cache over LoraLoader. One compiled graph for both models over all of it, and the models'
    weights back bit for bit."""
    high, low = pair("t2v_14b")
    folder, names = loras
    before = [dit_tiny.weights(m) for m in (high, low)]
    # (high LoRA, strength), (low LoRA, strength), Step Cache (rolling interval 2: step 1 of each 2-step stage cached)
    runs = ((("high", 1.0), ("low", 1.0), False), (("style", 0.7), ("low", 0.5), True))

    def cache(m, on):
        return harness.step_cache(comfy_host, m, interval=2) if on else m

    refs = [_split(cache(_loraloader(high, folder, names[a], sa), on), cache(_loraloader(low, folder, names[b], sb), on), "t2v_14b", cfg=1.0)
            for (a, sa), (b, sb), on in runs]
    assert harness.rel_err(refs[0], _split(high, low, "t2v_14b", cfg=1.0)) > 1e-3  # the LoRAs change the result
    _fresh_dynamo()
    ch, cl = _compile(comfy_adapter, accel, high), _compile(comfy_adapter, accel, low)
    hotswap = comfy_host.node("SDAccelLoRAHotSwap")
    for ((a, sa), (b, sb), on), ref in zip(runs, refs):
        out = _split(hotswap.apply(cache(ch, on), names[a], sa)[0], hotswap.apply(cache(cl, on), names[b], sb)[0], "t2v_14b", cfg=1.0)
        assert harness.rel_err(out, ref) < 1e-5, (a, b, on)
        if on:
            assert [s["cached_steps"] for s in stepcache_stats[-2:]] == [[1], [1]], stepcache_stats[-2:]
        assert _graphs() == 1 and not _counters()["recompiles"], (_graphs(), dict(_counters()["recompiles"]))
    _split(high, low, "t2v_14b", cfg=1.0, steps=2)  # the plain models sample: the hot-swapped LoRAs come out
    for m, w in zip((high, low), before):
        after = dit_tiny.weights(m)
        assert all(torch.equal(after[k], w[k]) for k in w)


def test_lcm_lora_sampler_with_one_half_of_a_wan22_a14b_pair_samples_that_model_and_warns_with_the_recipe(comfy_host, pair, loras, caplog):
    """The LCM-LoRA Sampler is one sampler over one model, so it cannot run the 14B split; with a high-noise
    lightx2v half it samples that model with the lightx2v settings and says how to run the pair."""
    import logging

    high, _ = pair("t2v_14b")
    _, names = loras
    pos, neg, latent = _inputs("t2v_14b")
    with caplog.at_level(logging.INFO), torch.inference_mode():
        out = comfy_host.node("SDAccelLCMLoRASampler").sample(high, pos, neg, latent, names["high"], 1.0, 42, 4, 1.5, 1.0, lora_settings=True)
    assert torch.isfinite(out[0]["samples"]).all()
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "A14B pair" in r.getMessage()]
    assert warn and "LoRA Hot-Swap" in warn[0] and "KSamplerAdvanced" in warn[0], warn
    assert any("high-noise half: 4 steps, CFG 1, lcm / simple, shift 5" in r.getMessage() for r in caplog.records)


def test_14b_split_fp16_cast_then_compile(comfy_host, comfy_adapter, comfy_cast, accel, pair):
    """FP16 Cast (bf16) on both models, then Compile Model: near eager, the input models untouched, and the two
    cast copies (same block structure) share one compiled graph."""
    high, low = pair("t2v_14b")
    ref = _split(high, low, "t2v_14b")
    castmod = comfy_host.pack_module("accel_core.casting")
    cast = [comfy_cast.apply_cast(m, castmod.CastConfig(dtype="bf16", channels_last=False)) for m in (high, low)]
    for c, m in zip(cast, (high, low)):
        assert c.get_model_object("diffusion_model").blocks[0].self_attn.q.weight.dtype == torch.bfloat16
        assert m.get_model_object("diffusion_model").blocks[0].self_attn.q.weight.dtype == torch.float32
    out = _split(*cast, "t2v_14b")
    assert harness.rel_err(out, ref) < 0.1  # bf16 rounding
    _fresh_dynamo()
    compiled = [_compile(comfy_adapter, accel, c) for c in cast]
    assert harness.rel_err(_split(*compiled, "t2v_14b"), out) < 1e-2
    assert _graphs() == 1 and not _counters()["recompiles"]


# --- Wan 2.2 TI2V 5B (per-frame timesteps) and Wan 2.1 I2V (image concat + CLIP features) ----------

def _timestep_shapes(model):
    """A clone of `model` that records the timestep shape each model call hands the diffusion model."""
    m, seen = model.clone(), []

    def record(apply_model, a):
        seen.append(tuple(m.model.process_timestep(a["timestep"], x=a["input"], **a["c"]).shape) if hasattr(m.model, "process_timestep")
                    else tuple(a["timestep"].shape))
        return apply_model(a["input"], a["timestep"], **a["c"])

    m.set_model_unet_function_wrapper(record)
    return m, seen


@pytest.mark.parametrize("variant", ["ti2v_5b", "i2v_21"])
def test_image_to_video_compile_and_step_cache(comfy_host, comfy_adapter, accel, pair, stepcache_stats, variant):
    """TI2V 5B: ComfyUI detects Wan 2.2 5B (WAN22), and Wan22ImageToVideoLatent's start image makes every call's
    timestep one per latent frame (the first frame, the image, at 0). Wan 2.1 I2V: the image latent and mask are
    concatenated to the input and CLIP features join the text. Compile equals eager with one graph and none new
    on a second run; the Step Cache caches the scheduled steps near eager and leaves the image frame as given."""
    import comfy.model_base

    model, _ = pair(variant)
    pos, neg, latent = _inputs(variant)
    ref = _one(model, variant)
    if variant == "ti2v_5b":
        assert type(model.model) is comfy.model_base.WAN22 and type(model.model.model_config).__name__ == "WAN22_T2V"
        probe, shapes = _timestep_shapes(model)
        _one(probe, variant, steps=1)
        frames = latent["samples"].shape[2]
        assert shapes and all(s == (2, frames) for s in shapes), shapes  # cond + uncond batched, one timestep per frame
        assert torch.allclose(ref[:, :, :1], latent["samples"][:, :, :1], atol=1e-5)  # the start image's frame is kept (up to the latent format's round trip)
    else:
        assert model.get_model_object("diffusion_model").img_emb is not None
    _fresh_dynamo()
    compiled = _compile(comfy_adapter, accel, model)
    out = _one(compiled, variant)
    assert harness.rel_err(out, ref) < 1e-5
    graphs = _graphs()
    assert graphs == 1, graphs
    assert torch.equal(_one(compiled, variant), out) and _graphs() == graphs and not _counters()["recompiles"]
    steps = 6
    ref6 = _one(model, variant, steps=steps)
    cached = _one(harness.step_cache(comfy_host, compiled, interval=3), variant, steps=steps)
    assert stepcache_stats[-1]["cached_steps"] == [1, 2, 4, 5] and stepcache_stats[-1]["span"] == [0.0, 1.0], stepcache_stats[-1]
    assert 0 < harness.rel_err(cached, ref6) < 0.3
    assert _graphs() == graphs and not _counters()["recompiles"]  # the step cache calls the same compiled block
    if variant == "ti2v_5b":
        assert torch.allclose(cached[:, :, :1], latent["samples"][:, :, :1], atol=1e-5)
