"""Compile, FP16 Cast and Step Cache on the DiT families (Flux, Qwen-Image, Z-Image, Wan, LTX-Video, MiniMax H3)
in a real ComfyUI.

Reduced-size models of each family's real ComfyUI class (tests/integration/dit_models.py),
sampled through ComfyUI's KSampler path. Every family compiles regionally through
`patches_replace["dit"]` (one compiled frame per block kind); Z-Image's NextDiT offers no such
hook, so its blocks get BlockHooks as object patches (families/hooks.py). Dynamo's "eager"
backend: tracing, guards and recompiles are what is tested here, not inductor's kernels.
"""
from __future__ import annotations

import logging

import pytest
import torch

import comfy_harness as harness
import dit_models

REGIONAL = ("flux", "qwen_image", "zimage", "wan", "ltx", "ltx2", "minimax")
# MiniMax H3 hands its blocks the modulation rows as Python ints (mod_segments): at sigma 1 audio and video share
# one timestep, so the first step's rows differ from the later steps' and a second graph is traced once.
SECOND_GRAPH = {"minimax": 1}


def _counters():
    from torch._dynamo.utils import counters

    return counters


def _graphs() -> int:
    return int(_counters()["stats"]["unique_graphs"])


@pytest.fixture(scope="module")
def models(comfy_host, tmp_path_factory):
    """family -> (MODEL, eager reference sample)."""
    out = {}
    tmp = tmp_path_factory.mktemp("dit")
    for fam in dit_models.FAMILIES:
        if dit_models.available(fam) is None:
            m = dit_models.build(fam, tmp=tmp)
            out[fam] = (m, dit_models.sample(m, fam))
    return out


def _model(models, fam):
    if fam not in models:
        pytest.skip(dit_models.available(fam))
    return models[fam]


def _config(accel, **kw):
    return accel.compile.CompileConfig(torch_backend="eager", **kw)


@pytest.mark.parametrize("fam", dit_models.FAMILIES)
def test_family_is_recognised(comfy_host, models, fam):
    model, _ = _model(models, fam)
    families = comfy_host.pack_module("accel_core.families")
    unet = model.get_model_object("diffusion_model")
    got = families.family_of(unet)
    assert got is not None and got.name == fam
    for bl, mods in got.block_lists(unet):
        assert len(mods) == dit_models.SPECS[fam].n_blocks[bl.attr]


@pytest.mark.parametrize("fam", dit_models.FAMILIES)
def test_compile_matches_eager_with_no_recompile_on_a_second_run(comfy_host, comfy_adapter, accel, models, fam):
    model, ref = _model(models, fam)
    torch._dynamo.reset()
    _counters().clear()
    compiled = comfy_adapter.apply_compile(model, _config(accel))
    assert compiled is not model
    out = dit_models.sample(compiled, fam)
    assert harness.rel_err(out, ref) < 1e-4
    first = _graphs()
    assert first >= 1
    again = dit_models.sample(compiled, fam)
    assert torch.equal(again, out)
    assert _graphs() == first, "the second sampling run recompiled"
    assert not _counters()["recompiles"], dict(_counters()["recompiles"])
    report = comfy_adapter.compile_report(compiled)
    assert report is not None and report["status"] == "compiled", report
    if fam in REGIONAL:
        families = comfy_host.pack_module("accel_core.families")
        unet = model.get_model_object("diffusion_model")
        kinds = len(families.family_of(unet).regions(unet))
        assert first == kinds + SECOND_GRAPH.get(fam, 0), f"{first} graphs for {kinds} block kinds: identical blocks must share one compiled frame"
        assert "regional" in report["target"]


@pytest.mark.parametrize("fam", REGIONAL)
def test_second_resolution_compiles_once_per_kind(comfy_host, comfy_adapter, accel, models, fam):
    model, _ = _model(models, fam)
    torch._dynamo.reset()
    _counters().clear()
    compiled = comfy_adapter.apply_compile(model, _config(accel))
    dit_models.sample(compiled, fam, size=8)
    kinds = _graphs()
    # Z-Image's context refiner sees only the text: ComfyUI 0.33 gives it the same inputs at any size, 0.8.0 does not.
    text_only = 1 if fam == "zimage" else 0
    dit_models.sample(compiled, fam, size=12)
    both = _graphs()
    assert 2 * kinds - text_only <= both <= 2 * kinds  # dynamic=False: one specialised graph per kind and resolution
    dit_models.sample(compiled, fam, size=8)
    dit_models.sample(compiled, fam, size=12)
    assert _graphs() == both


def test_a_block_that_fails_to_compile_runs_eager_and_is_named(comfy_host, comfy_adapter, accel, tmp_path):
    if dit_models.available("flux"):
        pytest.skip(dit_models.available("flux"))
    model = dit_models.build("flux", seed=5)
    ref = dit_models.sample(model, "flux")
    block = model.get_model_object("diffusion_model").double_blocks[1]
    cls_forward = type(block).forward

    def breaking_forward(*args, **kwargs):  # dynamo cannot keep this in one graph: fullgraph fails on it
        torch._dynamo.graph_break()
        return cls_forward(block, *args, **kwargs)

    block.forward = breaking_forward
    torch._dynamo.reset()
    compiled = comfy_adapter.apply_compile(model, _config(accel, fullgraph=True))
    out = dit_models.sample(compiled, "flux")
    assert harness.rel_err(out, ref) < 1e-4
    report = comfy_adapter.compile_report(compiled)
    assert list(report["fallbacks"]) == ["double_blocks.1"], report
    assert report["status"] == "partial"


def test_another_packs_block_replacement_runs_around_ours(comfy_host, comfy_adapter, accel, models):
    model, ref = _model(models, "flux")
    seen = []

    def theirs(args, extra):
        seen.append(type(extra["original_block"]).__name__)
        out = extra["original_block"](args)
        out["img"] = out["img"] * 1.0
        return out

    m = model.clone()
    m.set_model_patch_replace(theirs, "dit", "double_block", 0)
    torch._dynamo.reset()
    compiled = comfy_adapter.apply_compile(m, _config(accel))
    out = dit_models.sample(compiled, "flux")
    assert harness.rel_err(out, ref) < 1e-4
    assert seen and all(s == "partial" for s in seen)  # their replacement got our compiled block as its original


@pytest.mark.parametrize("fam", dit_models.FAMILIES)
def test_fp16_cast_bf16(comfy_host, comfy_cast, models, fam):
    model, ref = _model(models, fam)
    castmod = comfy_host.pack_module("accel_core.casting")
    cast = comfy_cast.apply_cast(model, castmod.CastConfig(dtype="bf16", channels_last=False))
    assert cast is not model
    unet = cast.get_model_object("diffusion_model")
    fam_of = comfy_host.pack_module("accel_core.families").family_of(unet)
    for name, p in unet.named_parameters():
        assert p.dtype == (torch.float32 if fam_of.keeps_dtype(name, unet) else torch.bfloat16), name
    assert all(p.dtype == torch.float32 for p in model.get_model_object("diffusion_model").parameters())
    out = dit_models.sample(cast, fam)
    assert harness.rel_err(out, ref) < 0.1  # bf16 rounding over 2 steps of a random model: ~0.05


@pytest.mark.parametrize("fam", dit_models.FAMILIES)
def test_step_cache_cuts_every_family_and_adaptive_measures_the_front_blocks(comfy_host, models, stepcache_stats, fam):
    """Fixed: the scheduled steps are cached and the result moves off eager; adaptive: a tiny threshold never
    caches (the front blocks' residual really changes between steps: LTX-Video's blocks add into their input
    in place, so the measure must not alias it) and a huge one caches up to the cap."""
    model, _ = _model(models, fam)
    steps = 6
    ref = dit_models.sample(model, fam, steps=steps, cfg=2.0)
    out = dit_models.sample(harness.step_cache(comfy_host, model, interval=3), fam, steps=steps, cfg=2.0)
    # per step: one call with cond and uncond batched, or one each (MiniMax H3 takes a batch of 1), each its own lane
    assert sorted(set(stepcache_stats[-1]["cached_steps"])) == [1, 2, 4, 5], stepcache_stats[-1]
    assert stepcache_stats[-1]["calls"] in (steps, 2 * steps)
    assert 0 < harness.rel_err(out, ref) < 0.5
    dit_models.sample(harness.step_cache(comfy_host, model, "adaptive", threshold=0.001), fam, steps=steps, cfg=2.0)
    assert stepcache_stats[-1]["cached_steps"] == [], stepcache_stats[-1]
    dit_models.sample(harness.step_cache(comfy_host, model, "adaptive", threshold=10.0, max_cached=2), fam, steps=steps, cfg=2.0)
    assert sorted(set(stepcache_stats[-1]["cached_steps"])) == [1, 2, 4, 5], stepcache_stats[-1]


def test_nodes_without_dit_support_pass_a_dit_model_through(comfy_host, comfy_adapter, models, caplog):
    model, _ = _model(models, "flux")
    dc = comfy_host.pack_module("accel_core.hosts.comfy.deepcache")
    dcmod = comfy_host.pack_module("accel_core.deepcaching")
    with caplog.at_level(logging.WARNING):
        out = dc.apply_deepcache(model, dcmod.DeepCacheConfig())
    assert out is model
    assert "Flux is not a model this node knows" in caplog.text


# LTX-2's guidance nodes (0.33+): an extra cond pass per step with switches its blocks read from transformer_options.
GUIDANCE = {"LTXVSpatioTemporalGuidance": dict(scale=1.0, blocks="1", start_percent=0.0, end_percent=1.0),  # stg_skip_self_attn on block 1
            "LTXVModalityGuidance": dict(modality_scale=3.0, start_percent=0.0, end_percent=1.0)}  # a2v / v2a cross-attention off


@pytest.mark.parametrize("node", GUIDANCE)
def test_ltx2_guidance_passes_compile_once_and_run_every_block_under_the_step_cache(comfy_host, comfy_adapter, accel, models,
                                                                                    stepcache_stats, node):
    """The compiled blocks see the guidance pass's switches (the result equals eager's; a second run traces
    nothing), and the step cache runs that pass in full: it logs as many calls as without the guidance."""
    import comfy_extras.nodes_lt as nodes_lt

    model, _ = _model(models, "ltx2")
    cls = getattr(nodes_lt, node, None)
    if cls is None:
        pytest.skip(f"this ComfyUI has no {node} node (0.33+)")
    out = cls.execute(model, **GUIDANCE[node])
    guided = out[0] if isinstance(out, tuple) else out.result[0]
    ref = dit_models.sample(guided, "ltx2", cfg=2.0)
    assert harness.rel_err(ref, dit_models.sample(model, "ltx2", cfg=2.0)) > 1e-3  # the pass changes the result
    torch._dynamo.reset()
    _counters().clear()
    compiled = comfy_adapter.apply_compile(guided, _config(accel))
    assert harness.rel_err(dit_models.sample(compiled, "ltx2", cfg=2.0), ref) < 1e-4
    first = _graphs()
    assert harness.rel_err(dit_models.sample(compiled, "ltx2", cfg=2.0), ref) < 1e-4
    assert _graphs() == first
    steps = 4  # cached: steps 1 and 2
    dit_models.sample(harness.step_cache(comfy_host, model, interval=3), "ltx2", steps=steps, cfg=2.0)
    plain = stepcache_stats[-1]
    dit_models.sample(harness.step_cache(comfy_host, guided, interval=3), "ltx2", steps=steps, cfg=2.0)
    assert stepcache_stats[-1]["calls"] == plain["calls"] and stepcache_stats[-1]["cached_steps"] == plain["cached_steps"] == [1, 2]


def test_an_unknown_model_passes_through_with_a_warning(comfy_host, comfy_adapter, accel, models, caplog):
    model, _ = _model(models, "flux")
    m = model.clone()
    m.add_object_patch("diffusion_model", torch.nn.Linear(2, 2))
    with caplog.at_level(logging.WARNING):
        out = comfy_adapter.apply_compile(m, _config(accel))
    assert out is m
    assert "Linear is not a model this node knows" in caplog.text


@pytest.mark.parametrize("fam", dit_models.FAMILIES)
def test_fp8_converts_the_block_linears_and_keeps_the_family_s_steering_layers(comfy_host, models, fam):
    model, _ = _model(models, fam)
    castmod = comfy_host.pack_module("accel_core.casting")
    fp8 = comfy_host.pack_module("accel_core.fp8")
    families = comfy_host.pack_module("accel_core.families")
    unet = model.get_model_object("diffusion_model")
    copy = castmod.cast(unet, castmod.CastConfig(dtype="bf16", channels_last=False), device_type="cpu")
    report = fp8.to_fp8(copy)
    skip = families.family_of(unet).fp8_skip
    converted = [n for n, m in copy.named_modules() if isinstance(m, fp8.FP8Linear)]
    assert report.converted == len(converted) > 0
    assert not [n for n in converted if any(s in n for s in skip)]
    block_list, blocks = families.family_of(unet).block_lists(unet)[-1]
    assert any(n.startswith(f"{block_list.attr}.") for n in converted)
    assert all(p.dtype == torch.float32 for p in unet.parameters())  # the input model is untouched


def test_fp8_flux_call_is_close_to_eager(comfy_host, models):
    model, _ = _model(models, "flux")
    castmod = comfy_host.pack_module("accel_core.casting")
    fp8 = comfy_host.pack_module("accel_core.fp8")
    unet = model.get_model_object("diffusion_model")
    copy = castmod.cast(unet, castmod.CastConfig(dtype="bf16", channels_last=False), device_type="cpu")
    fp8.to_fp8(copy)
    g = torch.Generator().manual_seed(0)
    x, ctx, y = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 8, 64, generator=g), torch.randn(1, 32, generator=g)
    t, guidance = torch.tensor([0.7]), torch.tensor([3.5])
    with torch.inference_mode():
        ref = unet(x, t, ctx, y=y, guidance=guidance)
        out = copy(x.bfloat16(), t.bfloat16(), ctx.bfloat16(), y=y.bfloat16(), guidance=guidance.bfloat16())
    # Per-tensor e4m3 on a 5-block random model of width 128: 0.12 measured (a wrong layer gives ~1).
    assert harness.rel_err(out, ref) < 0.2


def test_a_compiled_dit_model_is_freed_when_dropped(comfy_host, comfy_adapter, accel):
    import gc
    import weakref

    import comfy.model_management

    model = dit_models.build("flux", seed=9)
    compiled = comfy_adapter.apply_compile(model, _config(accel))
    assert torch.isfinite(dit_models.sample(compiled, "flux")).all()
    assert comfy_adapter.compile_report(compiled)["status"] == "compiled"
    unet = weakref.ref(model.model.diffusion_model)
    del model, compiled
    comfy.model_management.unload_all_models()
    gc.collect()
    assert unet() is None, "the regional compile keeps a dropped model alive"
