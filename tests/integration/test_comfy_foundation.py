"""SDAccelCompileUNet and SDAccelFP16Cast inside a real ComfyUI, on an SD1.5-architecture model.

The model comes from ComfyUI's checkpoint loader (a generated safetensors file with seeded
random weights), sampling is ComfyUI's KSampler path with cfg > 1, and every comparison is
against the unaccelerated model's output for the same seed. Most compile tests use dynamo's
"eager" backend (the same tracing, fallback and wrapper path as inductor, without minutes of
C++ compilation on a CPU); one goes through the node with real inductor.
"""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import comfy_harness as harness
from comfy_harness import CASES, INPAINT, TXT2IMG, Snapshot, rel_err, sample

# Same ops through dynamo's eager backend, or another attention kernel: reassociation only
# (seen: 1e-5 on ComfyUI 0.3.64, 0 on 0.8.0).
EXACT = 1e-4
# The compiled or re-patched model must match to this; a stale weight or a skipped LoRA is
# orders of magnitude off (test_lora_changes_output pins how far).
CLOSE = 1e-3
# bf16 keeps 8 mantissa bits: ~0.4% per rounding, accumulated over the UNet and two steps.
BF16 = 5e-2
DIFFUSION_MODEL = "diffusion_model"  # comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL on every host


def eager_compile(accel, **kw):
    return accel.compile.CompileConfig(torch_backend="eager", **kw)


# --- the pack inside ComfyUI ---------------------------------------------------------------------

def test_pack_loads_like_a_custom_node(comfy_host):
    mappings = comfy_host.nodes.NODE_CLASS_MAPPINGS
    for node_id in ("SDAccelCompileUNet", "SDAccelFP16Cast"):
        assert node_id in mappings, f"{node_id} not registered by ComfyUI {comfy_host.version}"
        assert mappings[node_id].__module__.startswith(comfy_host.pack.__name__)
        assert node_id in comfy_host.nodes.NODE_DISPLAY_NAME_MAPPINGS
        mappings[node_id].INPUT_TYPES()  # /object_info drops nodes whose INPUT_TYPES raises
    assert not [line for line in comfy_host.load_log if "Cannot import" in line or "IMPORT FAILED" in line]


def test_checkpoint_loads_as_sd15(sd15_model, comfy_host):
    import comfy.supported_models

    unet = sd15_model.model.diffusion_model
    assert type(sd15_model.model.model_config) is comfy.supported_models.SD15
    assert comfy_host.pack_module("accel_core.families").family_of(unet).name == "ldm"
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert {p.dtype for p in unet.parameters()} == {torch.float32}  # fp16 file, fp32 compute on the CPU


# --- Compile UNet ---------------------------------------------------------------------------------

def test_compile_node_inductor_txt2img(comfy_host, comfy_adapter, sd15_model, reference):
    """The node as a workflow calls it, with the real inductor backend."""
    before = Snapshot.of(sd15_model)
    (compiled,) = comfy_host.node("SDAccelCompileUNet").apply(sd15_model, "inductor", "default", False, False)
    assert compiled is not sd15_model
    assert before.diff(sd15_model) == []
    out = sample(compiled, TXT2IMG)
    report = comfy_adapter.compile_report(compiled)
    assert report["backend"] == "inductor" and report["status"] in ("compiled", "partial"), report
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(TXT2IMG)) < CLOSE
    assert before.diff(sd15_model) == []


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_compiled_matches_eager(case, comfy_adapter, accel, sd15_model, reference):
    before = Snapshot.of(sd15_model)
    compiled = comfy_adapter.apply_compile(sd15_model, eager_compile(accel))
    out = sample(compiled, case)
    ref = reference(case)
    assert rel_err(out, ref) < EXACT
    if case.mask:  # outside the mask the init latent is kept
        keep = case.latent()["noise_mask"].expand_as(out) == 0
        assert torch.allclose(out[keep], case.latent()["samples"][keep])
    assert before.diff(sd15_model) == []
    assert comfy_adapter.COMPILE_KEY in compiled.wrappers[DIFFUSION_MODEL]


def test_compiled_survives_clone_lora_and_unload(comfy_host, comfy_adapter, accel, sd15_model, reference, lora_name):
    import comfy.model_management

    lora = comfy_host.node("LoraLoader")
    compiled = comfy_adapter.apply_compile(sd15_model, eager_compile(accel))
    base = reference(TXT2IMG)
    with_lora = reference(TXT2IMG, lora.load_lora(sd15_model, None, lora_name, 1.0, 0.0)[0], key=lora_name)

    (compiled_lora, _) = lora.load_lora(compiled, None, lora_name, 1.0, 0.0)
    assert comfy_adapter.COMPILE_KEY in compiled_lora.wrappers[DIFFUSION_MODEL], "compile wrapper lost by LoraLoader's clone"
    assert len(compiled_lora.patches) == len(harness.lora_targets(sd15_model))
    assert rel_err(sample(compiled_lora), with_lora) < CLOSE

    comfy.model_management.unload_all_models()
    assert rel_err(sample(compiled_lora), with_lora) < CLOSE, "stale weights after unload/reload"

    # The same compiled graphs without the LoRA: every patched weight must be restored.
    assert rel_err(sample(compiled.clone()), base) < CLOSE, "LoRA weights stuck after removing the LoRA"


def test_lora_changes_output(comfy_host, sd15_model, reference, lora_name):
    """Guards the LoRA test's tolerance: the LoRA moves the output far more than CLOSE."""
    with_lora = reference(TXT2IMG, comfy_host.node("LoraLoader").load_lora(sd15_model, None, lora_name, 1.0, 0.0)[0], key=lora_name)
    assert rel_err(with_lora, reference(TXT2IMG)) > 30 * CLOSE


def _host_attention(func, *args, **kwargs):
    """A user's optimized_attention_override that keeps the attention ComfyUI picked."""
    return func(*args, **kwargs)


def test_compiled_model_gets_an_attention_that_compiles(comfy_host, comfy_adapter, accel, sd15_model, reference):
    """ComfyUI's CPU attention (sub-quadratic) asks for free memory on every call; the compiled
    clone gets SDPA instead, so the whole UNet converts even with fullgraph=True. The input keeps its own."""
    import comfy.ldm.modules.attention as attn

    if attn.optimized_attention is not getattr(attn, "attention_sub_quad", None):
        pytest.skip(f"this ComfyUI picked {attn.optimized_attention.__name__}, not sub-quadratic attention")
    torch._dynamo.reset()
    before = Snapshot.of(sd15_model)
    compiled = comfy_adapter.apply_compile(sd15_model, eager_compile(accel, fullgraph=True))
    assert rel_err(sample(compiled, TXT2IMG), reference(TXT2IMG)) < CLOSE
    report = comfy_adapter.compile_report(compiled)
    assert report["status"] == "compiled" and not report["whole_error"], report
    assert before.diff(sd15_model) == []


def test_fullgraph_fallback_on_host_attention(comfy_adapter, accel, sd15_model, reference):
    """With the user's own choice of ComfyUI's CPU attention (sub-quadratic), which asks psutil for
    free memory, dynamo cannot trace it with fullgraph=True. The whole UNet fails, blocks compile
    one by one, and the attention modules stay eager, named in the report; the output is unchanged."""
    # Dynamo caches per code object and fullgraph is not part of the guard: after an earlier
    # fullgraph=False compile of UNetModel._forward (other tests), the fullgraph=True one would
    # silently reuse that graph-broken code instead of failing.
    torch._dynamo.reset()
    model = sd15_model.clone()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = _host_attention
    compiled = comfy_adapter.apply_compile(model, eager_compile(accel, fullgraph=True))
    # The fallback descends one level per model call (a failing unit runs eager for that call,
    # its children are tried on the next): whole UNet, SpatialTransformer, BasicTransformerBlock,
    # attention. Two 2-step runs are four calls, enough to reach the attention modules.
    for run in range(2):
        assert rel_err(sample(compiled, TXT2IMG), reference(TXT2IMG)) < EXACT, f"run {run}"
    report = comfy_adapter.compile_report(compiled)
    assert report["whole_error"], report
    assert report["status"] == "partial", report
    assert report["units_compiled"] > 0
    kept_eager = [name.rsplit(".", 1)[-1] for name in report["fallbacks"]]
    assert kept_eager.count("attn1") == kept_eager.count("attn2") == 16, report["fallbacks"]  # every SD1.5 attention
    # `model` and its compiled clone die together at the end of this test: ComfyUI's loaded-model
    # entry would find no live parent to switch to, so unload it while both live.
    import comfy.model_management

    comfy.model_management.unload_all_models()


# --- FP16 Cast ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cast_bf16_close_to_fp32(case, comfy_host, sd15_model, reference):
    before = Snapshot.of(sd15_model)
    (cast,) = comfy_host.node("SDAccelFP16Cast").apply(sd15_model, "bf16", True, "auto")
    assert before.diff(sd15_model) == []
    unet = cast.get_model_object("diffusion_model")  # the clone's own copy, an object patch
    assert unet is not sd15_model.model.diffusion_model and cast.model.diffusion_model is sd15_model.model.diffusion_model
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    out = sample(cast, case)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out, reference(case)) < BF16
    assert before.diff(sd15_model) == []


def test_cast_fp32_channels_last_near_exact(comfy_host, sd15_model, reference):
    before = Snapshot.of(sd15_model)
    (cast,) = comfy_host.node("SDAccelFP16Cast").apply(sd15_model, "fp32", True, "math")
    conv = cast.get_model_object("diffusion_model").input_blocks[0][0].weight
    assert conv.dtype == torch.float32 and conv.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(sample(cast, INPAINT), reference(INPAINT)) < EXACT  # SDPA instead of sub-quadratic
    assert before.diff(sd15_model) == []


# --- bad input ------------------------------------------------------------------------------------

def _unknown_model():
    """A real ComfyUI MODEL whose diffusion model is of no family SD Accel knows (a Flux MODEL
    whose diffusion model is object-patched to a Linear: Flux itself is a registered family)."""
    m = _tiny_flux()
    m.add_object_patch("diffusion_model", torch.nn.Linear(2, 2))
    return m


def _tiny_flux():
    """A real ComfyUI MODEL that is not a UNet (a one-block Flux DiT)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    from comfy.ldm.flux.model import FluxParams

    cfg = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64,
               mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
               patch_size=2, qkv_bias=True, guidance_embed=False)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:  # ComfyUI >= 0.4
        cfg["txt_ids_dims"] = []
    mc = comfy.supported_models.Flux(cfg)
    mc.set_inference_dtype(torch.float32, None)
    base = mc.get_model({}, "", device=torch.device("cpu"))
    with torch.no_grad():  # ComfyUI leaves weights uninitialised (NaN would defeat the snapshot check)
        for p in base.parameters():
            p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


@pytest.mark.parametrize("node_id,inputs", [
    ("SDAccelCompileUNet", ("auto", "default", False, False)),
    ("SDAccelFP16Cast", ("auto", True, "auto")),
])
def test_unknown_model_passes_through(node_id, inputs, comfy_host, caplog):
    model = _unknown_model()
    before = Snapshot.of(model)
    with caplog.at_level(logging.WARNING, logger="sd_accel"):
        (out,) = comfy_host.node(node_id).apply(model, *inputs)
    assert out is model
    assert before.diff(model) == []
    assert any("is not a model this node knows" in r.getMessage() and "Linear" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("node_id,inputs,choices", [
    ("SDAccelCompileUNet", ("tensorrt", "default", False, False), "auto, inductor, onediff, stable-fast"),
    ("SDAccelCompileUNet", ("inductor", "fastest", False, False), "default, max-autotune-no-cudagraphs, reduce-overhead"),
    ("SDAccelFP16Cast", ("fp8", True, "auto"), "auto, fp16, bf16, fp32"),
    ("SDAccelFP16Cast", ("bf16", True, "sage"), "auto, flash, efficient, math"),
])
def test_unknown_option_raises_with_choices(node_id, inputs, choices, comfy_host, accel, sd15_model):
    before = Snapshot.of(sd15_model)
    with pytest.raises(accel.errors.SDAccelError, match=choices):
        comfy_host.node(node_id).apply(sd15_model, *inputs)
    assert before.diff(sd15_model) == []


# --- lifetimes ------------------------------------------------------------------------------------

def test_compiled_model_is_freed_when_dropped(comfy_adapter, accel):
    """ComfyUI frees a model nobody references any more (switching checkpoints); having been
    compiled must not keep its UNet (3.4 GB for SD1.5 in fp32) alive."""
    import gc
    import weakref

    import comfy.model_management

    model = harness.tiny_unet_model()
    compiled = comfy_adapter.apply_compile(model, eager_compile(accel))
    assert torch.isfinite(sample(compiled)).all()
    assert comfy_adapter.compile_report(compiled)["status"] == "compiled"
    unet = weakref.ref(model.model.diffusion_model)
    del model, compiled
    comfy.model_management.unload_all_models()
    gc.collect()
    assert unet() is None, "the compile registry keeps a dropped model's UNet alive"
