"""Step Cache with something adding into the features between the blocks (a real ComfyUI, COMFYUI_PATH).

A ControlNet's output (ComfyUI adds it after each block, `control` of the model call) and post-block
model patches (`set_model_double_block_patch`: Qwen-Image's DiffSynth ControlNet, Z-Image's
ControlNet) act between the blocks a cached call skips. A change kept over a full call's blocks
holds those additions, and a cached call's host code adds them again. The ControlNet's output does
not depend on the features, so the run keeps the change without it; the patches read the features,
so their calls run every block (the image is eager's) and say why.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import comfy_harness as harness

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
import small_dit  # noqa: E402

STEPS = 7
SMALL = {"flux": dict(hidden_size=128, num_heads=1, depth=2, depth_single_blocks=3, context_in_dim=32, vec_in_dim=32),
         "qwen": dict(num_layers=3, num_attention_heads=1, joint_attention_dim=32),
         "wan": dict(dim=128, ffn_dim=256, num_heads=1, num_layers=3)}


def _model(comfy_host, fam):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    if not hasattr(comfy.supported_models, small_dit.SPECS[fam].supported):
        pytest.skip(f"this ComfyUI has no {small_dit.SPECS[fam].supported} model config")
    base, _, _ = small_dit.build(fam, smoke=True, seed=1, **SMALL[fam])
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def _sample(model, fam):
    import comfy.sample

    spec = small_dit.spec_for(fam, smoke=True)
    dim = SMALL[fam].get("context_in_dim", SMALL[fam].get("joint_attention_dim", spec.ctx_dim))
    pos, neg = small_dit.conds(small_dit.dataclasses.replace(spec, ctx_dim=dim), [1])
    noise = torch.randn(small_dit.latent_shape(spec, 1, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, STEPS, 2.0, "euler", "simple", pos, neg, torch.zeros_like(noise), seed=0, disable_pbar=True)


def _reads_and_adds(kwargs):
    """A post-block patch as the DiffSynth ControlNet is one: a function of the features, added to them."""
    kwargs["img"] = kwargs["img"] + 0.05 * torch.tanh(kwargs["img"])
    return kwargs


@pytest.mark.parametrize("fam", ("qwen", "wan"))
def test_a_post_block_patch_turns_caching_off_and_the_run_equals_eager(comfy_host, stepcache_stats, fam):
    patched = _model(comfy_host, fam).clone()
    patched.set_model_double_block_patch(_reads_and_adds)
    m = harness.step_cache(comfy_host, patched, interval=3)
    out = _sample(m, fam)
    assert stepcache_stats[-1]["cached"] == 0 and stepcache_stats[-1]["calls"] == STEPS, stepcache_stats[-1]
    assert torch.equal(out, _sample(patched, fam))
    _sample(harness.step_cache(comfy_host, _model(comfy_host, fam), interval=3), fam)  # without the patch it caches
    assert stepcache_stats[-1]["cached_steps"] == [1, 2, 4, 5], stepcache_stats[-1]


def _controlnet(model, calls: int | None = None):
    """`model` with a stand-in ControlNet: the model call gets `control` (what ComfyUI's ControlNet computes each
    step; Flux adds it after each double block (`input`) and single block (`output`)), for the first `calls` calls
    (a ControlNet's end_percent) or all of them."""
    import comfy.patcher_extension as pe

    seen = []

    def control_for(x):
        tokens, width = (x.shape[-2] // 2) * (x.shape[-1] // 2), SMALL["flux"]["hidden_size"]
        add = torch.linspace(-0.2, 0.2, tokens * width).reshape(1, tokens, width).expand(x.shape[0], -1, -1).to(x.dtype)
        return {"input": [add, add], "output": [add, add, add], "middle": []}

    def controlnet(executor, x, t, c_concat=None, c_crossattn=None, control=None, *args, **kwargs):  # apply_model's order
        seen.append(1)
        active = calls is None or (len(seen) - 1) % STEPS < calls  # each sampling run: the first `calls` calls
        return executor(x, t, c_concat, c_crossattn, control_for(x) if active else control, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test.controlnet", controlnet)
    return m


def test_a_controlnets_output_is_added_once_on_cached_steps(comfy_host, stepcache_stats):
    """A ControlNet's output does not depend on the features: a full call keeps the middle blocks' change
    without it, and ComfyUI adds the step's control after each skipped block. Seen in the cached run's error:
    with the ControlNet it is what the same cache makes without one, not the control counted twice."""
    plain, controlled = _model(comfy_host, "flux"), _controlnet(_model(comfy_host, "flux"))
    base_err = harness.rel_err(_sample(harness.step_cache(comfy_host, plain, interval=3), "flux"), _sample(plain, "flux"))
    ref = _sample(controlled, "flux")
    assert not torch.equal(ref, _sample(plain, "flux"))  # the control reached the blocks
    out = _sample(harness.step_cache(comfy_host, controlled, interval=3), "flux")
    assert stepcache_stats[-1]["cached_steps"] == [1, 2, 4, 5] and stepcache_stats[-1]["calls"] == STEPS, stepcache_stats[-1]
    err = harness.rel_err(out, ref)
    assert 0 < err < 2 * base_err, (err, base_err)
    assert torch.equal(_sample(harness.step_cache(comfy_host, controlled, interval=1), "flux"), ref)


def test_a_controlnet_that_ends_mid_run_keeps_the_schedule(comfy_host, stepcache_stats):
    """A ControlNet with end_percent < 1 stops adding mid-run: the change kept at a controlled full step holds
    no control, so the cached steps after it add none."""
    controlled = _controlnet(_model(comfy_host, "flux"), calls=4)
    out = _sample(harness.step_cache(comfy_host, controlled, interval=3), "flux")
    assert stepcache_stats[-1]["cached_steps"] == [1, 2, 4, 5], stepcache_stats[-1]
    assert 0 < harness.rel_err(out, _sample(controlled, "flux")) < 0.5


def test_z_images_controlnet_patch_turns_caching_off_through_the_block_hooks(comfy_host, stepcache_stats):
    """Z-Image's ControlNet (ZImageFunControlnet) patches `double_block` / `noise_refiner`; its blocks reach the
    Step Cache through BlockHooks, which hand it the call's transformer_options all the same."""
    import dit_models

    reason = dit_models.available("zimage")
    if reason:
        pytest.skip(reason)
    patched = dit_models.build("zimage", seed=1).clone()
    patched.set_model_double_block_patch(_reads_and_adds)
    out = dit_models.sample(harness.step_cache(comfy_host, patched, interval=3), "zimage", steps=STEPS, cfg=2.0, seed=42)
    assert stepcache_stats[-1]["cached"] == 0 and stepcache_stats[-1]["calls"] == STEPS, stepcache_stats[-1]
    assert torch.equal(out, dit_models.sample(patched, "zimage", steps=STEPS, cfg=2.0, seed=42))
