"""Image-edit DiT models (reference latents) under Compile, Step Cache, FP16 Cast and LoRA Hot-Swap,
in a real ComfyUI.

Qwen-Image-Edit (2509 and 2511) and Flux Kontext / Flux.2 take reference images: ComfyUI's
ReferenceLatent node puts `reference_latents` in the conditioning, the model's `extra_conds` turn it
into `ref_latents` (and `ref_latents_method`), and the model's `_forward` appends the reference
tokens to the image sequence every block sees. With "index_timestep_zero" (Qwen-Image-Edit-2511: an
`__index_timestep_zero__` buffer in the file, which ComfyUI's detection reads; Flux / Flux.2: the
method set in the conditioning) the timestep batch is doubled and the blocks modulate the
reference tokens with timestep 0 (`timestep_zero_index`, handed to them in `block_wrap`'s closure).

Reduced models of the real classes (dit_models.py), sampled through `nodes.common_ksampler`. The
reference latents have another size than the image (12 tokens against 16) so nothing may assume
the reference is as large as the image. Hosts skip where the model's code lacks the feature (probed
from the code: `_forward` takes `ref_latents`; the blocks take `timestep_zero_index`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest
import torch

import comfy_harness as harness
import dit_models
import dit_tiny

STEPS = 6  # interval 3: cached steps 1, 2, 4, 5


@dataclass(frozen=True)
class Case:
    family: str  # dit_models family
    method: str | None = None  # reference_latents_method set in the conditioning (None: the model's default)
    marker: bool = False  # Qwen-Image-Edit-2511: the __index_timestep_zero__ buffer in the state dict
    flux2: bool = False  # Flux.2 (where the host's detection recognises the reduced file), else Flux.1
    cfg: float = 1.0  # Flux Kontext / Flux.2: guidance-distilled, CFG 1; Qwen-Image-Edit: CFG with refs on both sides

    @property
    def timestep_zero(self) -> bool:
        return self.marker or self.method == "index_timestep_zero"


CASES = {
    "qwen_edit": Case("qwen_image", cfg=2.0),  # Qwen-Image-Edit / 2509: method "index"
    "qwen_edit_2511": Case("qwen_image", marker=True, cfg=2.0),
    "flux_kontext": Case("flux"),  # Flux.1 Kontext: ComfyUI's default "offset"
    "flux_timestep_zero": Case("flux", method="index_timestep_zero", flux2=True),
}
# Flux.2 (reduced): what ComfyUI 0.33's detection reads from a flux2 state dict, narrowed to 128 wide (1 head).
FLUX2 = dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=64, hidden_size=128,
             mlp_ratio=3.0, num_heads=1, depth=1, depth_single_blocks=2, axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1,
             qkv_bias=False, guidance_embed=True, txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True, ops_bias=False,
             default_ref_method="index", ref_index_scale=10.0, yak_mlp=False, txt_norm=False)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _node_out(out):
    return out[0] if isinstance(out, tuple) else out.result[0]


# --- capability probes (the host's code, not its version) -------------------------------------------

def _missing(case: Case, dm) -> str | None:
    """Why this host's model cannot run `case`, or None."""
    if "ref_latents" not in inspect.signature(type(dm)._forward).parameters:
        return f"this ComfyUI's {type(dm).__name__}._forward takes no ref_latents"
    if case.timestep_zero:
        fn = type(dm).forward_orig if hasattr(type(dm), "forward_orig") else type(dm.transformer_blocks[0]).forward
        if "timestep_zero_index" not in inspect.signature(fn).parameters:
            return f"this ComfyUI's {type(dm).__name__} has no index_timestep_zero reference method"
    return None


# --- models -----------------------------------------------------------------------------------------

def _patcher(base):
    import comfy.model_management as mm
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def _qwen_2511():
    """A reduced Qwen-Image whose state dict carries Qwen-Image-Edit-2511's marker; the reference method is
    what ComfyUI's own detection makes of that state dict (None: this host's detection does not read it)."""
    import comfy.model_detection
    import comfy.supported_models as sm

    spec = dit_models.SPECS["qwen_image"]
    base = sm.QwenImage(dict(spec.unet_config)).get_model({}, "", device=torch.device("cpu"))
    sd = dit_models.seed_weights(base.diffusion_model, 0, spec.std)
    sd["__index_timestep_zero__"] = torch.tensor([])
    method = (comfy.model_detection.detect_unet_config(sd, "") or {}).get("default_ref_method")
    if method != "index_timestep_zero":
        return None
    mc = sm.QwenImage(dict(spec.unet_config, default_ref_method=method))
    mc.set_inference_dtype(torch.float32, None)
    base = mc.get_model({}, "", device=torch.device("cpu"))
    base.diffusion_model.load_state_dict(sd)  # strict: the buffer is the model's too
    return _patcher(base)


def _flux2(tmp):
    """A reduced Flux.2 through ComfyUI's file loader, or None where its detection does not take a reduced one."""
    import comfy.sd
    import comfy.supported_models as sm
    import comfy.utils

    if not hasattr(sm, "Flux2"):
        return None
    try:
        mc = sm.Flux2(dict(FLUX2))
        mc.set_inference_dtype(torch.float32, None)
        sd = dit_models.seed_weights(mc.get_model({}, "", device=torch.device("cpu")).diffusion_model, 0)
        path = tmp / "tiny_flux2.safetensors"
        comfy.utils.save_torch_file(sd, str(path))
        m = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    except (TypeError, ValueError, RuntimeError):  # < 0.33: detection fixes 48 heads (or the class lacks a field)
        return None
    return m if type(m.model.model_config).__name__ == "Flux2" else None


@pytest.fixture(scope="module")
def built(comfy_host, tmp_path_factory):
    """case name -> (MODEL, flux2?) or a skip reason."""
    tmp = tmp_path_factory.mktemp("edit")
    out = {}
    for name, case in CASES.items():
        if dit_models.available(case.family):
            out[name] = dit_models.available(case.family)
            continue
        m, flux2 = None, False
        if case.marker:
            m = _qwen_2511()
            if m is None:
                out[name] = "this ComfyUI's detection does not read Qwen-Image-Edit-2511's __index_timestep_zero__ marker"
                continue
        elif case.flux2:
            m = _flux2(tmp)
            flux2 = m is not None
        if m is None:
            m = dit_models.build(case.family, tmp=tmp)
        why = _missing(case, m.get_model_object("diffusion_model"))
        out[name] = why if why else (m, flux2)
    return out


def _get(built, name):
    got = built[name]
    if isinstance(got, str):
        pytest.skip(got)
    return got


# --- sampling with reference latents -----------------------------------------------------------------

def _shapes(case: Case, flux2: bool):
    """(latent shape, reference latent shape): the reference 12 tokens, the image 16."""
    if case.family == "qwen_image":
        return (1, 16, 1, 8, 8), (1, 16, 1, 6, 8)
    if flux2:
        return (1, 128, 4, 4), (1, 128, 3, 4)
    return (1, 16, 8, 8), (1, 16, 6, 8)


def conditioning(case: Case, flux2: bool, refs: bool = True, method: str | None = "case"):
    """Positive and negative conditioning through ComfyUI's ReferenceLatent node (and its Flux
    reference-method node); Qwen-Image-Edit's text encoder gives both sides the images, so both get them."""
    import comfy_extras.nodes_edit_model as edit

    g = torch.Generator().manual_seed(3)
    ctx = 48 if case.family == "qwen_image" else 64
    extra = {} if case.family == "qwen_image" else ({"guidance": 3.5} if flux2 else {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5})
    pos = [[torch.randn(1, 8, ctx, generator=g), dict(extra)]]
    neg = [[torch.randn(1, 8, ctx, generator=g), dict(extra)]]
    if not refs:
        return pos, neg
    ref = torch.randn(_shapes(case, flux2)[1], generator=torch.Generator().manual_seed(11))
    pos, neg = (_node_out(edit.ReferenceLatent.execute(c, {"samples": ref})) for c in (pos, neg))
    method = case.method if method == "case" else method
    if method is not None:
        import comfy_extras.nodes_flux as nf

        pos, neg = (_node_out(nf.FluxKontextMultiReferenceLatentMethod.execute(c, method)) for c in (pos, neg))
    return pos, neg


def sample(model, case: Case, flux2: bool, steps: int = 2, refs: bool = True, method: str | None = "case") -> torch.Tensor:
    import nodes

    pos, neg = conditioning(case, flux2, refs, method)
    latent = {"samples": torch.zeros(_shapes(case, flux2)[0])}
    with torch.inference_mode():
        out = nodes.common_ksampler(model, 42, steps, case.cfg, "euler", "simple", pos, neg, latent)
    return out[0]["samples"].clone()


@pytest.fixture(scope="module")
def eager(built):
    """case name -> {steps: eager sample}, sampled once."""
    cache = {}

    def get(name, steps=2):
        if (name, steps) not in cache:
            m, flux2 = _get(built, name)
            cache[(name, steps)] = sample(m, CASES[name], flux2, steps)
        return cache[(name, steps)]

    return get


# --- the tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_the_references_and_the_method_reach_the_model(comfy_host, built, eager, name):
    """What the other tests rest on: the reference tokens change the result, and so does the method."""
    m, flux2 = _get(built, name)
    case = CASES[name]
    with_refs = eager(name)
    assert harness.rel_err(sample(m, case, flux2, refs=False), with_refs) > 1e-3
    if case.timestep_zero:
        assert harness.rel_err(sample(m, case, flux2, method="index"), with_refs) > 1e-4  # Qwen: ~1e-3 on random weights


def _kinds(comfy_host, m) -> int:
    unet = m.get_model_object("diffusion_model")
    return len(comfy_host.pack_module("accel_core.families").family_of(unet).regions(unet))


@pytest.mark.parametrize("name", CASES)
def test_compile_matches_eager_once_per_block_kind_and_the_step_cache_over_it_traces_nothing_new(comfy_host, comfy_adapter, accel,
                                                                                                built, eager, stepcache_stats, name):
    """Compile: equal to eager, one compiled frame per block kind, nothing traced on a second run. Step Cache
    (forecast) on the compiled model: the scheduled steps cached, equal to the uncompiled cache, still no new graph."""
    from torch._dynamo.utils import counters

    m, flux2 = _get(built, name)
    case = CASES[name]
    plain = sample(harness.step_cache(comfy_host, m, "forecast"), case, flux2, STEPS)
    torch._dynamo.reset()
    counters.clear()
    compiled = comfy_adapter.apply_compile(m, accel.compile.CompileConfig(torch_backend="eager"))
    out = sample(compiled, case, flux2)
    assert harness.rel_err(out, eager(name)) < 1e-4
    kinds = _kinds(comfy_host, m)
    assert _graphs() == kinds, f"{_graphs()} graphs for {kinds} block kinds"
    assert torch.equal(sample(compiled, case, flux2), out)
    assert comfy_adapter.compile_report(compiled)["status"] == "compiled"
    cached = sample(harness.step_cache(comfy_host, compiled, "forecast"), case, flux2, STEPS)
    assert stepcache_stats[-1]["cached_steps"] == [1, 2, 4, 5], stepcache_stats[-1]
    assert harness.rel_err(cached, plain) < 1e-4
    assert _graphs() == kinds and not counters["recompiles"], dict(counters["recompiles"])


@pytest.mark.parametrize("name", CASES)
def test_step_cache_caches_on_schedule_full_calls_equal_eager_and_interval_1_is_eager(comfy_host, built, eager, stepcache_stats, name):
    m, flux2 = _get(built, name)
    case = CASES[name]
    assert torch.equal(sample(harness.step_cache(comfy_host, m, interval=1), case, flux2), eager(name))
    ref = eager(name, STEPS)
    outs = {}
    for mode in ("fixed", "forecast"):
        cm = harness.step_cache(comfy_host, m, mode, interval=3)
        calls = harness.record_calls(cm)
        outs[mode] = sample(cm, case, flux2, STEPS)
        assert stepcache_stats[-1]["cached_steps"] == [1, 2, 4, 5] and stepcache_stats[-1]["calls"] == STEPS, stepcache_stats[-1]
        if mode == "fixed":  # the recorded calls carry every reference input: recomputed without the cache, bit for bit
            harness.check_full_calls(cm, calls, full=(0, 3), cached=1)
        assert 0 < harness.rel_err(outs[mode], ref) < 0.5, mode
    assert not torch.equal(outs["fixed"], outs["forecast"])  # steps 4, 5 extrapolate from full steps 0 and 3


def test_references_on_cond_only_cache_both_lanes_in_either_cfg_mode(comfy_host, built, stepcache_stats):
    """Flux Kontext with CFG > 1 and a negative without the reference: cond and uncond differ in length, so
    ComfyUI calls them apart. Each keeps its cache ("shared" too: no residual fits both; one shared lane
    was dropped at every call and never cached). Compile traces one frame per kind and length, as for any
    second resolution (test_dit_families.py)."""
    import nodes

    m, flux2 = _get(built, "flux_kontext")
    case = CASES["flux_kontext"]
    pos, neg = conditioning(case, flux2)[0], conditioning(case, flux2, refs=False)[1]

    def run(model, steps=4):
        with torch.inference_mode():
            return nodes.common_ksampler(model, 42, steps, 2.0, "euler", "simple", pos, neg, {"samples": torch.zeros(1, 16, 8, 8)})[0]["samples"]

    ref = run(m)
    for cfg in ("separate", "shared"):
        out = run(harness.step_cache(comfy_host, m, interval=3, cfg=cfg))
        stats = stepcache_stats[-1]
        assert stats["lanes"] == 2 and stats["cached_steps"] == [1, 1, 2, 2] and stats["calls"] == 8, (cfg, stats)
        assert 0 < harness.rel_err(out, ref) < 0.5


@pytest.mark.parametrize("name", CASES)
def test_fp16_cast_bf16_with_references(comfy_host, comfy_cast, built, eager, name):
    m, flux2 = _get(built, name)
    castmod = comfy_host.pack_module("accel_core.casting")
    cast = comfy_cast.apply_cast(m, castmod.CastConfig(dtype="bf16", channels_last=False))
    assert cast.get_model_object("diffusion_model").img_in.weight.dtype == torch.bfloat16
    out = sample(cast, CASES[name], flux2)
    assert torch.isfinite(out).all()
    assert 0 < harness.rel_err(out, eager(name)) < 0.1  # bf16 rounding over 2 steps of a random model


@pytest.mark.parametrize("name", ("qwen_edit_2511", "flux_kontext"))
def test_lora_hot_swap_on_the_compiled_edit_model_equals_loraloader_without_recompiling(comfy_host, comfy_adapter, accel, built,
                                                                                       eager, tmp_path, name):
    import comfy.sd
    import comfy.utils
    from safetensors.torch import save_file
    from torch._dynamo.utils import counters

    m, flux2 = _get(built, name)
    case = CASES[name]
    hl = comfy_host.pack_module("accel_core.hosts.comfy.lora")
    paths = []
    for seed in (1, 2):
        paths.append(str(tmp_path / f"{name}_{seed}.safetensors"))
        save_file(dit_tiny.make_lora(m, case.family, "diffusers", seed=seed), paths[-1])
    torch._dynamo.reset()
    counters.clear()
    compiled = comfy_adapter.apply_compile(m, accel.compile.CompileConfig(torch_backend="eager"))
    a = sample(hl.apply_hotswap(compiled, paths[0], 0.8), case, flux2)
    graphs = _graphs()
    b = sample(hl.apply_hotswap(compiled, paths[1], 1.0), case, flux2)
    assert _graphs() == graphs and not counters["recompiles"], "a LoRA swap recompiled"
    for out, path, strength in ((a, paths[0], 0.8), (b, paths[1], 1.0)):
        ref = sample(comfy.sd.load_lora_for_models(m, None, comfy.utils.load_torch_file(path, safe_load=True), strength, 0)[0], case, flux2)
        assert harness.rel_err(ref, eager(name)) > 1e-3  # the LoRA changes the result
        assert harness.rel_err(out, ref) < 1e-4
    assert harness.rel_err(sample(compiled, case, flux2), eager(name)) < 1e-4  # the LoRA is gone from the compiled model


def test_flux_kv_cache_blocks_run_uncompiled_with_a_note_and_the_step_cache_still_caches(comfy_host, comfy_adapter, accel, built,
                                                                                       stepcache_stats, caplog):
    """ComfyUI's Flux KV Cache node (0.33, Flux.2): index_timestep_zero as the model's default (an object patch),
    an attention patch inside every block that keeps the reference tokens' keys and values from the first call,
    and an input patch that drops the reference tokens from the later calls. Compile leaves such blocks to
    ComfyUI's own code and says so; the Step Cache starts over when the length drops after the first call."""
    import logging

    import comfy_extras.nodes_flux as nf
    from torch._dynamo.utils import counters

    if not hasattr(nf, "FluxKVCache"):
        pytest.skip("this ComfyUI has no FluxKVCache node")
    m, flux2 = _get(built, "flux_timestep_zero")
    if not flux2:
        pytest.skip("the Flux KV Cache needs Flux.2, which this ComfyUI's detection does not take at reduced size")
    case = CASES["flux_timestep_zero"]
    kv = _node_out(nf.FluxKVCache.execute(m))
    steps = 4
    ref = sample(kv, case, flux2, steps, method=None)
    assert harness.rel_err(ref, sample(m, case, flux2, steps)) > 1e-6  # the KV cache is at work (~5e-5 on random weights)
    torch._dynamo.reset()
    counters.clear()
    with caplog.at_level(logging.INFO):
        compiled = comfy_adapter.apply_compile(kv, accel.compile.CompileConfig(torch_backend="eager"))
        assert harness.rel_err(sample(compiled, case, flux2, steps, method=None), ref) < 1e-4
    assert "patches the attention inside the blocks (attn1_patch" in caplog.text
    assert _graphs() == 0
    out = sample(harness.step_cache(comfy_host, kv, interval=3), case, flux2, steps, method=None)
    # step 0 (with the reference) full; step 1 is shorter: its lane starts over, full; then cached up to step 4
    assert stepcache_stats[-1]["cached_steps"] == [2, 3], stepcache_stats[-1]
    assert 0 < harness.rel_err(out, ref) < 0.5
