"""Step Cache through a real ComfyUI (COMFYUI_PATH): the node on reduced Flux, Qwen-Image and Wan models
of ComfyUI's own classes (tests/gpu/small_dit.py, the builder the trained judge models use),
KSampler runs with CFG, Compile stacking.

The runtime's arithmetic is tested host-free in tests/unit/test_stepcache.py; here: that
ComfyUI's block hooks, sigmas, cond/uncond batches and wrappers reach it as assumed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import comfy_harness as harness

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
import small_dit  # noqa: E402

FAMS = ("flux", "qwen", "wan")
STEPS = 7
SMALL = {  # 5, 3 and 3 blocks
    "flux": dict(hidden_size=128, num_heads=1, depth=2, depth_single_blocks=3, context_in_dim=32, vec_in_dim=32),
    "qwen": dict(num_layers=3, num_attention_heads=1, joint_attention_dim=32),
    "wan": dict(dim=128, ffn_dim=256, num_heads=1, num_layers=3),
}


@pytest.fixture(scope="module")
def models(comfy_host):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    out = {}
    for fam in FAMS:
        if hasattr(comfy.supported_models, small_dit.SPECS[fam].supported):
            base, spec, _ = small_dit.build(fam, smoke=True, seed=1, **SMALL[fam])
            out[fam] = (comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()), spec)
    return out


def _model(models, fam):
    if fam not in models:
        pytest.skip(f"this ComfyUI has no {small_dit.SPECS[fam].supported} model config")
    return models[fam][0]


@pytest.fixture
def stats(stepcache_stats):
    return stepcache_stats


step_cache = harness.step_cache


def sample(model, fam, seed=0):
    import comfy.sample

    spec = small_dit.spec_for(fam, smoke=True)
    spec = small_dit.dataclasses.replace(spec, ctx_dim=SMALL[fam].get("context_in_dim", SMALL[fam].get("joint_attention_dim", spec.ctx_dim)))
    pos, neg = small_dit.conds(spec, [1])
    noise = torch.randn(small_dit.latent_shape(spec, 1, 8), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, STEPS, 2.0, "euler", "simple", pos, neg, torch.zeros_like(noise), seed=seed, disable_pbar=True)


@pytest.mark.parametrize("fam", FAMS)
def test_fixed_schedule_caches_the_scheduled_steps_and_full_calls_equal_eager_bit_for_bit(comfy_host, models, stats, fam):
    model = _model(models, fam)
    m = step_cache(comfy_host, model, interval=3)
    calls = harness.record_calls(m)
    cached = sample(m, fam)
    assert stats[-1]["cached_steps"] == [1, 2, 4, 5] and stats[-1]["calls"] == STEPS, stats[-1]
    assert len(calls) == STEPS  # cond and uncond in one batch per step
    harness.check_full_calls(m, calls)
    ref = sample(model, fam)
    assert 0 < harness.rel_err(cached, ref) < 0.5
    assert model.model_options.get("transformer_options", {}).get("patches_replace") is None  # the input model is untouched


def test_deepcache_schedules_on_a_dit_follow_their_plan(comfy_host, models, stats):
    model = _model(models, "flux")
    plan = comfy_host.pack_module("accel_core.stepplan").plan
    config = comfy_host.pack_module("accel_core.stepcache").StepCacheConfig
    for schedule in ("uniform", "non-uniform"):
        sample(step_cache(comfy_host, model, interval=3, start=0.2, schedule=schedule), "flux")
        full = plan(STEPS, config(interval=3, start_percent=0.2, schedule=schedule))
        assert stats[-1]["cached_steps"] == [i for i, f in enumerate(full) if not f] and stats[-1]["cached_steps"], schedule
    assert stats[-1]["cached_steps"] != stats[-2]["cached_steps"]  # the two plans differ here


@pytest.mark.parametrize("fam", ("flux",))
def test_adaptive_threshold_zero_never_caches_and_huge_caches_up_to_the_cap(comfy_host, models, stats, fam):
    model = _model(models, fam)
    ref = sample(model, fam)
    assert torch.equal(sample(step_cache(comfy_host, model, "adaptive", threshold=0.0), fam), ref)
    assert stats[-1]["cached_steps"] == []
    sample(step_cache(comfy_host, model, "adaptive", threshold=10.0, max_cached=2), fam)
    assert stats[-1]["cached_steps"] == [1, 2, 4, 5]
    # a cut past Flux's join of text and image (front = both double blocks): measured on the cut's features
    sample(step_cache(comfy_host, model, "adaptive", front=2, threshold=10.0, max_cached=2), fam)
    assert stats[-1]["cached_steps"] == [1, 2, 4, 5]
    sample(step_cache(comfy_host, model, "adaptive", front=2, threshold=0.0), fam)
    assert stats[-1]["cached_steps"] == []


@pytest.mark.parametrize("fam", ("flux", "wan"))
def test_forecast_differs_from_reuse_and_state_resets_per_run(comfy_host, models, stats, fam):
    model = _model(models, fam)
    reuse = step_cache(comfy_host, model, "fixed", interval=3)
    fore = step_cache(comfy_host, model, "forecast", interval=3)
    a, b = sample(reuse, fam), sample(fore, fam)
    assert stats[-1]["cached_steps"] == stats[-2]["cached_steps"] == [1, 2, 4, 5]
    assert not torch.equal(a, b)
    assert torch.equal(sample(fore, fam), b)  # a second run starts from nothing: same result
    assert stats[-1] == stats[-2]


def test_shared_cfg_equals_separate_when_cond_and_uncond_come_batched(comfy_host, models, stats):
    model = _model(models, "flux")
    a = sample(step_cache(comfy_host, model, cfg="separate"), "flux")
    b = sample(step_cache(comfy_host, model, cfg="shared"), "flux")
    assert torch.equal(a, b) and stats[-1]["lanes"] == stats[-2]["lanes"] == 1


def test_another_packs_block_replacement_still_runs_and_reapplying_does_not_stack(comfy_host, models, stats):
    model = _model(models, "flux").clone()
    seen = []

    def other(args, extra):
        seen.append(args["transformer_options"].get("block_index"))
        return extra["original_block"](args)

    model.set_model_patch_replace(other, "dit", "double_block", 1)
    m = step_cache(comfy_host, step_cache(comfy_host, model, interval=2), interval=3)
    dit = m.model_options["transformer_options"]["patches_replace"]["dit"]
    hs = comfy_host.pack_module("accel_core.hosts.comfy.stepcache")
    assert dit[("double_block", 1)].prior is other and dit[("double_block", 0)].prior is None
    sample(m, "flux")
    assert stats[-1]["cached_steps"] == [1, 2, 4, 5]
    assert len(seen) == 3  # double block 1 is in the cached middle: it ran on the 3 full steps only
    assert isinstance(dit[("double_block", 0)], hs.BlockReplacement)


@pytest.mark.parametrize("order", ("compile_first", "cache_first"))
def test_with_compile_each_block_kind_compiles_once_and_nothing_recompiles_over_two_runs(comfy_host, comfy_adapter, accel, models, stats, order):
    from torch._dynamo.utils import counters

    model = _model(models, "flux")
    plain = sample(step_cache(comfy_host, model, "forecast"), "flux")
    torch._dynamo.reset()
    counters.clear()
    cfg = accel.compile.CompileConfig(torch_backend="eager")
    if order == "compile_first":
        m = step_cache(comfy_host, comfy_adapter.apply_compile(model, cfg), "forecast")
    else:
        m = comfy_adapter.apply_compile(step_cache(comfy_host, model, "forecast"), cfg)
    out = sample(m, "flux")
    assert stats[-1]["cached_steps"] == [1, 2, 4, 5]
    graphs = int(counters["stats"]["unique_graphs"])
    assert graphs == 2  # one frame per block kind (double, single), cached steps included
    assert harness.rel_err(out, plain) < 1e-4
    assert torch.equal(sample(m, "flux"), out)
    assert int(counters["stats"]["unique_graphs"]) == graphs and not counters["recompiles"], dict(counters["recompiles"])


def test_settings_a_model_cannot_take_get_a_clear_message_and_leave_it_untouched(comfy_host, accel, models):
    unet = harness.tiny_unet_model()
    before = dict(unet.model_options)
    with pytest.raises(accel.errors.SDAccelError, match="adaptive mode is not available on UNets"):  # a UNet is cut as DeepCache cuts it
        step_cache(comfy_host, unet, "adaptive")
    assert unet.model_options == before
    model = models.get("flux", (None,))[0]
    if model is not None:
        with pytest.raises(accel.errors.SDAccelError, match="front_blocks"):
            step_cache(comfy_host, model, front=3, back=2)  # Flux here has 5 blocks
