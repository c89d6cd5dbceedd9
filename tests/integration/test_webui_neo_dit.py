"""Forge Neo's own DiT classes through SD Accel's Forge adapter, on the CPU.

The models are Neo's (`backend/nn/flux.py`, `qwen.py`, `wan.py`, `lumina.py` NextDiT with Z-Image
modulation) at tiny sizes with seeded random weights, wrapped the way Neo's loader wraps them
(`UnetPatcher.from_model`: its KModel with the flow predictor), and called the way Neo's
`sampling_function` calls a `model_function_wrapper`. Only Neo's `backend` package is imported
(torch, einops, safetensors, psutil): no gradio start-up, so this file runs in the test
Python of the other integration tests too, with WEBUI_NEO_PATH naming a
Neo tree. Run it in a pytest process of its own (Neo's `modules` package). Dynamo's eager
backend: tracing, guards and recompiles are tested here, not inductor's kernels.
"""
from __future__ import annotations

import copy
import importlib
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

import webui_harness as harness
from testkit.events import collected

FAMILIES = ("flux", "qwen_image", "wan", "zimage")
REGIONAL = ("flux", "qwen_image", "wan")


@pytest.fixture(scope="module")
def neo():
    root = harness.root("neo")
    if root is None or not (root / "backend" / "nn" / "flux.py").is_file():
        pytest.skip(f"no Forge Neo tree: set WEBUI_NEO_PATH ({harness.setup_lines('neo')[0]})")
    for p in (str(root), str(root / "modules_forge" / "packages")):
        if p not in sys.path:
            sys.path.insert(0, p) if p == str(root) else sys.path.append(p)
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]  # backend.args parses the command line at import
    try:
        mods = {n: importlib.import_module(f"backend.{n}") for n in ("nn.flux", "nn.qwen", "nn.wan", "nn.lumina", "patcher.unet", "modules.k_prediction")}
    except ImportError as e:
        pytest.skip(f"Neo's backend does not import in this Python ({e}); see docs/webui.md for Neo's venv")
    finally:
        sys.argv = argv
    dynamic = importlib.import_module("backend.args").dynamic_args
    ops = dynamic.ops
    dynamic.ops = dynamic.ops or "ForgeOperations"  # what Neo's loader records when it builds the model (KModel reads it)
    yield mods
    dynamic.ops = ops


@pytest.fixture(autouse=True)
def _eager_dynamo(monkeypatch):
    monkeypatch.setenv("SD_ACCEL_DYNAMO_BACKEND", "eager")
    yield
    from sd_accel.accel_core.hosts import webui

    webui.finish_generation()
    webui.clear_caches()


class _Config:
    sampling_settings = {"shift": 1.0}
    memory_usage_factor = 1.0


def _build(neo, family: str):
    """(Neo's UnetPatcher around a tiny seeded model of `family`, its inputs: x, sigma, context, extra conds)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 5, 16, generator=g)
    if family == "flux":
        model = neo["nn.flux"].IntegratedFluxTransformer2DModel(
            in_channels=4, out_channels=4, vec_in_dim=8, context_in_dim=16, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=2,
            depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
        x, extra = torch.randn(1, 4, 8, 8, generator=g), {"y": torch.randn(1, 8, generator=g), "guidance": torch.tensor([3.5])}
    elif family == "qwen_image":
        model = neo["nn.qwen"].QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                                           num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6))
        x, extra = torch.randn(1, 4, 1, 8, 8, generator=g), {}
    elif family == "wan":
        model = neo["nn.wan"].WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=4, dim=32, ffn_dim=64, freq_dim=16, text_dim=16,
                                       out_dim=4, num_heads=2, num_layers=2)
        x, extra = torch.randn(1, 4, 1, 8, 8, generator=g), {}
    else:
        model = neo["nn.lumina"].NextDiT(patch_size=2, in_channels=4, dim=256, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                         multiple_of=16, ffn_dim_multiplier=2.0, cap_feat_dim=16, axes_dims=(32, 48, 48),
                                         axes_lens=(64, 64, 64), z_image_modulation=True, qk_norm=True)
        x, extra = torch.randn(1, 4, 8, 8, generator=g), {}
    for p in model.parameters():  # seeded, small: a random DiT stays finite
        p.data.normal_(0, 0.05, generator=g)
    cpu = torch.device("cpu")
    model.storage_dtype = model.computation_dtype = torch.float32  # what Neo's loader sets
    model.load_device = model.offload_device = model.initial_device = cpu
    pred = neo["modules.k_prediction"].PredictionFlux(_Config())
    patcher = neo["patcher.unet"].UnetPatcher.from_model(model, None, _Config(), k_predictor=pred)
    return patcher, (x, torch.tensor([0.6]), ctx, extra)


def _reference(patcher, inputs):
    x, sigma, ctx, extra = inputs
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options={}, **extra)


def _sample_call(patcher, inputs):
    """One model call as Neo's calc_cond_uncond_batch makes it: the wrapper gets apply_model and the call's conds."""
    x, sigma, ctx, extra = inputs
    c = {"c_crossattn": ctx, "transformer_options": {"cond_or_uncond": [0], "sigmas": sigma}, **extra}
    fn = patcher.model_options.get("model_function_wrapper")
    with torch.no_grad():
        if fn is None:
            return patcher.model.apply_model(x, sigma, **c)
        return fn(patcher.model.apply_model, {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": [0]})


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("family", FAMILIES)
def test_neo_dit_is_recognised(neo, family):
    from sd_accel.accel_core.families import family_of

    patcher, _ = _build(neo, family)
    assert family_of(patcher.model.diffusion_model).name == family


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_on_neo_dit_matches_eager_and_does_not_recompile(neo, family):
    from sd_accel.accel_core.hosts import webui
    from sd_accel.accel_core.hosts.webui.forge_dit import DitWrapper

    patcher, inputs = _build(neo, family)
    ref = _reference(patcher, inputs)
    before = copy.copy(patcher.model_options)
    m, applied = webui.apply_forge(patcher, webui.WebuiOptions(enabled=True, backend="inductor"))
    assert patcher.model_options == before and m is not patcher
    assert isinstance(m.model_options["model_function_wrapper"], DitWrapper) == (family in REGIONAL)
    out = _sample_call(m, inputs)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    report = applied.compile_report
    assert report.status == "compiled", report.summary()
    assert ("regional" in report.target) == (family in REGIONAL)
    graphs = _graphs()
    assert torch.allclose(_sample_call(m, inputs), ref, atol=1e-5, rtol=1e-4)
    assert _graphs() == graphs  # the second call reuses the compiled frames
    assert "forward" not in patcher.model.diffusion_model.__dict__


def _kohya(path, name, up, down):
    save_file({f"lora_unet_{name}.lora_up.weight": up.contiguous(), f"lora_unet_{name}.lora_down.weight": down.contiguous(),
               f"lora_unet_{name}.alpha": torch.tensor(float(down.shape[0]))}, str(path))


def test_lora_hot_swap_on_neo_flux_with_compile_and_bit_exact_restore(neo, tmp_path):
    from sd_accel.accel_core.hosts import webui

    patcher, inputs = _build(neo, "flux")
    flux = patcher.model.diffusion_model
    weights = {k: v.clone() for k, v in flux.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    qkv = flux.double_blocks[1].img_attn.qkv.weight
    up, down = torch.randn(qkv.shape[0], 2, generator=g) * 0.05, torch.randn(2, qkv.shape[1], generator=g) * 0.05
    _kohya(tmp_path / "style.safetensors", "double_blocks_1_img_attn_qkv", up, down)
    m, applied = webui.apply_forge(patcher, webui.WebuiOptions(enabled=True, backend="inductor", loras=(("style", 0.8),)), lora_dirs=str(tmp_path))
    out = _sample_call(m, inputs)
    assert torch.allclose(qkv, weights["double_blocks.1.img_attn.qkv.weight"] + 0.8 * up @ down, atol=1e-6)
    with torch.no_grad():
        fused_ref = flux(*inputs[:1], patcher.model.predictor.timestep(inputs[1]).float(), inputs[2], transformer_options={}, **inputs[3])
    assert torch.allclose(out, patcher.model.predictor.calculate_denoised(inputs[1], fused_ref.float(), inputs[0]), atol=1e-5, rtol=1e-4)
    webui.finish_generation()
    assert all(torch.equal(v, weights[k]) for k, v in flux.state_dict().items())


def test_an_sd_lora_on_neo_flux_is_refused_and_the_model_untouched(neo, tmp_path):
    from sd_accel.accel_core.hosts import webui

    patcher, inputs = _build(neo, "flux")
    flux = patcher.model.diffusion_model
    weights = {k: v.clone() for k, v in flux.state_dict().items()}
    _kohya(tmp_path / "sd15.safetensors", "input_blocks_1_1_proj_in", torch.randn(32, 2), torch.randn(2, 32))
    m, _ = webui.apply_forge(patcher, webui.WebuiOptions(enabled=True, loras=(("sd15", 1.0),)), lora_dirs=str(tmp_path))
    with pytest.raises(webui.SDAccelError, match="Flux"):
        _sample_call(m, inputs)
    assert all(torch.equal(v, weights[k]) for k, v in flux.state_dict().items())


def test_step_cache_on_neo_zimage_and_lcm_step_aside_with_a_note(neo):
    """Neo's NextDiT (Z-Image) offers no block hook: the Step Cache is refused with a note, the model left as it is."""
    from sd_accel.accel_core.hosts import webui

    patcher, inputs = _build(neo, "zimage")
    weights = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    before = copy.copy(patcher.model_options)
    m, applied = webui.apply_forge(patcher, webui.WebuiOptions(enabled=True, deepcache_interval=3, lcm_lora="lcm-lora-sdv1-5"))
    assert m is patcher and patcher.model_options == before
    status = applied.status()
    assert "Step Cache not applied" in status and "NextDiT's forward has none" in status and "Cache interval to 1" in status
    assert "LCM-LoRA not applied" in status and "DeepCache" not in status
    assert torch.equal(_sample_call(m, inputs), _reference(patcher, inputs))
    assert all(torch.equal(v, weights[k]) for k, v in patcher.model.diffusion_model.state_dict().items())


# --- the Step Cache: the cache controls on Neo's DiT models ----------------------------------------------

STEPS = 6


def _sample(patcher, inputs, sigmas=None):
    """One Euler run as Neo's k-diffusion sampler makes it: the run's sigmas in the patcher's transformer_options
    (`sampling_sigmas`, a new tensor per run), each call's options a copy with its sigma (calc_cond_uncond_batch)."""
    x, _, ctx, extra = inputs
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1) if sigmas is None else sigmas
    patcher.model_options.setdefault("transformer_options", {})["sampling_sigmas"] = sigmas
    fn = patcher.model_options.get("model_function_wrapper")
    x = x * sigmas[0]
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            sigma = s.reshape(1)
            c = {"c_crossattn": ctx, **extra,
                 "transformer_options": {**patcher.model_options["transformer_options"], "cond_or_uncond": [0], "sigmas": sigma}}
            if fn is None:
                denoised = patcher.model.apply_model(x, sigma, **c)
            else:
                denoised = fn(patcher.model.apply_model, {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": [0]})
            x = x + (x - denoised) / s * (s_next - s)
    return x


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def stepcache_events():
    from sd_accel.accel_core import events

    with collected(events, "stepcache_stats") as seen:
        yield seen


@pytest.mark.parametrize("family", REGIONAL)
def test_step_cache_on_neo_dit_caches_on_schedule_and_stays_near_eager(neo, family, stepcache_events):
    from sd_accel.accel_core.hosts import webui
    from sd_accel.accel_core.hosts.webui.forge_dit import DitWrapper

    patcher, inputs = _build(neo, family)
    eager = _sample(patcher, inputs)
    m, applied = webui.apply_forge(patcher, webui.WebuiOptions(enabled=True, deepcache_interval=3))
    assert isinstance(m.model_options["model_function_wrapper"], DitWrapper) and applied.status() is None
    cached = _sample(m, inputs)
    stats = webui.finish_generation()["stepcache"]
    assert [s["cached_steps"] for s in stats] == [[1, 2, 4, 5]] and stepcache_events == stats  # the run's event, one per run
    assert stats[0]["calls"] == STEPS and stats[0]["block_fraction"] < 1
    err = _rel(cached, eager)
    assert 1e-5 < err < 0.02, err  # the middle blocks' kept residual stands in on 4 of 6 steps: near eager, not equal
    # Interval 1 is off: nothing is installed, the run is Neo's own.
    off, _ = webui.apply_forge(patcher, webui.WebuiOptions(enabled=True, deepcache_interval=1))
    assert off is patcher and torch.equal(_sample(off, inputs), eager)
    # The cache installed, but its window leaves no step to cache: every block runs, the result is eager's exactly.
    m, _ = webui.apply_forge(patcher, webui.WebuiOptions(enabled=True, deepcache_interval=3, deepcache_start=0.9))
    assert torch.equal(_sample(m, inputs), eager)
    assert webui.finish_generation()["stepcache"][0]["cached"] == 0


@pytest.mark.parametrize("family", REGIONAL)
def test_compiled_and_cached_runs_do_not_recompile_across_runs(neo, family):
    from sd_accel.accel_core.hosts import webui

    patcher, inputs = _build(neo, family)
    opts = webui.WebuiOptions(enabled=True, backend="inductor", deepcache_interval=3, stepcache_mode="forecast")
    m, _ = webui.apply_forge(patcher, replace(opts, backend="off"))
    eager_cached = _sample(m, inputs)
    webui.finish_generation()
    m, applied = webui.apply_forge(patcher, opts)
    first = _sample(m, inputs)
    assert applied.compile_report.status == "compiled" and applied.status() is None, applied.describe()
    graphs = _graphs()
    second = _sample(m, inputs)  # the sampler's next run in the same pass (another sigmas tensor)
    stats = webui.finish_generation()["stepcache"]
    m, _ = webui.apply_forge(patcher, opts)  # the next generation: a new pass over the same compiled blocks
    third = _sample(m, inputs)
    stats += webui.finish_generation()["stepcache"]
    assert _graphs() == graphs  # cached steps call fewer of the same compiled blocks: nothing recompiles
    assert [s["cached_steps"] for s in stats] == [[1, 2, 4, 5]] * 3
    assert torch.allclose(first, eager_cached, atol=1e-5, rtol=1e-4) and torch.equal(first, second) and torch.equal(first, third)
