"""Step Cache on Z-Image / Lumina 2 (ComfyUI's NextDiT) through a real ComfyUI (COMFYUI_PATH).

NextDiT's forward offers no `patches_replace["dit"]` hook, so the node (and Compile Model) put a
BlockHook in place of each block as an object patch on the clone (families/hooks.py,
hosts/comfy/blockhooks.py). Here: the hook reaches the same StepCacheRun decisions as on Flux,
a cached call equals the full one when the input is unchanged, every mode runs, Compile stacks
with one frame per block kind and no recompile, the incoming model and its weight names stay as
they were, and LoRAs still apply. Reduced Z-Image (Lumina 2 on ComfyUI 0.3.64, which has no
Z-Image) from tests/integration/dit_models.py.
"""
from __future__ import annotations

import pytest
import torch

import comfy_harness as harness
import dit_models
import dit_tiny

FAM = "zimage"
STEPS = 7


@pytest.fixture(scope="module")
def model(comfy_host):
    reason = dit_models.available(FAM)
    if reason:
        pytest.skip(reason)
    return dit_models.build(FAM, seed=1)


@pytest.fixture
def stats(stepcache_stats):
    return stepcache_stats


step_cache = harness.step_cache


def sample(model, seed=42):
    return dit_models.sample(model, FAM, steps=STEPS, cfg=2.0, seed=seed)


def _block_class(model, i=0):
    return type(model.get_model_object(f"diffusion_model.layers.{i}")).__name__


def test_fixed_schedule_caches_the_scheduled_steps_and_full_calls_equal_eager(comfy_host, model, stats):
    m = step_cache(comfy_host, model, interval=3)
    calls = harness.record_calls(m)
    cached = sample(m)
    assert stats[-1]["cached_steps"] == [1, 2, 4, 5] and stats[-1]["calls"] == STEPS, stats[-1]
    harness.check_full_calls(m, calls)
    assert 0 < harness.rel_err(cached, sample(model)) < 0.5


def test_a_cached_call_equals_the_full_call_when_the_input_is_unchanged(comfy_host, model, stats):
    m = step_cache(comfy_host, model, interval=3)
    pairs = []

    def twice(apply_model, a):
        out = apply_model(a["input"], a["timestep"], **a["c"])
        if not pairs:  # step 0: a full call, then the same input again (the same step: cached)
            pairs.append((out.clone(), apply_model(a["input"], a["timestep"], **a["c"]).clone()))
        return out

    m.set_model_unet_function_wrapper(twice)
    sample(m)
    full, again = pairs[0]
    assert stats[-1]["cached_steps"] == [0, 1, 2, 4, 5]  # the second call of step 0 was cached
    assert stats[-1]["calls"] == STEPS + 1
    torch.testing.assert_close(again, full, rtol=1e-5, atol=1e-5)  # to rounding: the residual is added back


def test_adaptive_and_forecast_run_and_reset_per_run(comfy_host, model, stats):
    ref = sample(model)
    assert torch.equal(sample(step_cache(comfy_host, model, "adaptive", threshold=0.0)), ref)
    assert stats[-1]["cached_steps"] == [] and stats[-1]["calls"] == STEPS
    sample(step_cache(comfy_host, model, "adaptive", threshold=10.0, max_cached=2))
    assert stats[-1]["cached_steps"] == [1, 2, 4, 5]
    fixed = sample(step_cache(comfy_host, model, "fixed", interval=3))
    fore = step_cache(comfy_host, model, "forecast", interval=3)
    b = sample(fore)
    assert stats[-1]["cached_steps"] == stats[-2]["cached_steps"] == [1, 2, 4, 5]
    assert not torch.equal(fixed, b)
    assert torch.equal(sample(fore), b) and stats[-1] == stats[-2]  # a second run starts from nothing


def test_the_incoming_model_and_its_weight_names_stay_as_they_were(comfy_host, model, stats):
    keys = list(model.model.state_dict())
    ref = sample(model)
    m = step_cache(comfy_host, model)
    assert model.object_patches == {} and _block_class(model) == "JointTransformerBlock"
    assert _block_class(m) == "BlockHook"
    hooks = comfy_host.pack_module("accel_core.families.hooks")
    hook = m.get_model_object("diffusion_model.layers.1")
    assert hooks.unwrap(hook) is model.get_model_object("diffusion_model.layers.1")
    seen = {}

    def peek(apply_model, a):  # inside the run the hooks are in the shared model: the names are the same
        seen["type"] = type(m.model.diffusion_model.layers[1]).__name__
        seen["keys"] = list(m.model.state_dict())
        seen["same"] = all(p is q for p, q in zip(m.model.diffusion_model.layers[1].parameters(), hooks.unwrap(hook).parameters()))
        return apply_model(a["input"], a["timestep"], **a["c"])

    m.set_model_unet_function_wrapper(peek)
    sample(m)
    assert seen == {"type": "BlockHook", "keys": keys, "same": True}
    assert torch.equal(sample(model), ref)  # the plain model runs eager, as before
    assert list(model.model.state_dict()) == keys


@pytest.mark.parametrize("order", ("compile_first", "cache_first"))
def test_with_compile_each_block_kind_compiles_once_and_nothing_recompiles_over_two_runs(comfy_host, comfy_adapter, accel, model, stats, order):
    from torch._dynamo.utils import counters

    plain = sample(step_cache(comfy_host, model, "forecast"))
    torch._dynamo.reset()
    counters.clear()
    cfg = accel.compile.CompileConfig(torch_backend="eager")
    if order == "compile_first":
        m = step_cache(comfy_host, comfy_adapter.apply_compile(model, cfg), "forecast")
    else:
        m = comfy_adapter.apply_compile(step_cache(comfy_host, model, "forecast"), cfg)
    out = sample(m)
    assert stats[-1]["cached_steps"] == [1, 2, 4, 5]
    graphs = int(counters["stats"]["unique_graphs"])
    assert graphs == 3  # one frame per block kind (context refiner, noise refiner, layers), cached steps included
    assert harness.rel_err(out, plain) < 1e-4
    assert torch.equal(sample(m), out)
    assert int(counters["stats"]["unique_graphs"]) == graphs and not counters["recompiles"], dict(counters["recompiles"])
    report = comfy_adapter.compile_report(m)
    assert report["status"] == "compiled" and "regional" in report["target"], report


def test_loras_still_apply_in_either_order(comfy_host, model, stats):
    import comfy.sd

    lora = dit_tiny.make_lora(model, FAM, "kohya")

    def with_lora(m):
        return comfy.sd.load_lora_for_models(m, None, lora, 0.8, 0)[0]

    cached = step_cache(comfy_host, model)
    plain = sample(cached)  # leaves the hooks in the shared model: ComfyUI keeps it loaded
    assert type(model.model.diffusion_model.layers[0]).__name__ == "BlockHook"
    a, b = with_lora(cached), with_lora(model)
    assert set(a.patches) == set(b.patches) and len(b.patches) == len(dit_tiny._block_weights(model))
    first, second = sample(a), sample(step_cache(comfy_host, b))
    assert torch.equal(first, second) and not torch.equal(first, plain)
    assert stats[-1]["cached_steps"] == [1, 2, 4, 5]


def test_lora_hot_swap_stacks_with_the_cache(comfy_host, model, stats, tmp_path):
    import comfy.sd
    from safetensors.torch import save_file

    hl = comfy_host.pack_module("accel_core.hosts.comfy.lora")
    path = tmp_path / "z.safetensors"
    lora = dit_tiny.make_lora(model, FAM, "kohya", seed=2)
    save_file(lora, str(path))
    ref = sample(step_cache(comfy_host, comfy.sd.load_lora_for_models(model, None, lora, 0.8, 0)[0]))
    ours = sample(hl.apply_hotswap(step_cache(comfy_host, model), str(path), 0.8))
    assert stats[-1]["cached_steps"] == [1, 2, 4, 5]
    assert harness.rel_err(ours, ref) < 1e-4 and harness.rel_err(ours, sample(step_cache(comfy_host, model))) > 1e-3
