"""DynamicVRAM (ComfyUI >= ~0.16 on NVIDIA) on the CPU, as far as the CPU has it.

A DynamicVRAM MODEL keeps its weights in read-only mapped files, so the nodes that change
weights (Compile UNet, FP16 Cast, LoRA Hot-Swap, LCM-LoRA) must work on a regular copy that
ComfyUI rebuilds from the checkpoint file (`clone(disable_dynamic=True)`, as its own
TorchCompileModel does). ComfyUI's dynamic patcher itself needs CUDA (on the CPU its
constructor returns a classic one), so here a classic MODEL loaded from a file answers
`is_dynamic()` with True: the host's real rebuild path runs, aimdo does not. The real thing runs
on the GPU in tests/gpu/dynamic_vram.py.
"""
from __future__ import annotations

import inspect
import logging

import pytest
import torch

import comfy_harness as harness
from comfy_harness import Snapshot


def _dynamic_looking(model):
    m = model.clone()
    m.is_dynamic = lambda: True  # instance attribute: clones made from it are classic again
    return m


@pytest.fixture()
def dyn(comfy_host, sd15_model):
    if "disable_dynamic" not in inspect.signature(sd15_model.clone).parameters:
        pytest.skip("this ComfyUI has no DynamicVRAM (ModelPatcher.clone takes no disable_dynamic)")
    return _dynamic_looking(sd15_model)


def test_compile_runs_on_a_regular_copy(comfy_adapter, accel, dyn, reference, caplog):
    before = Snapshot.of(dyn)
    config = accel.compile.CompileConfig(backend="inductor", torch_backend="eager")
    with caplog.at_level(logging.INFO, logger="sd_accel"):
        out = comfy_adapter.apply_compile(dyn, config)
    assert out.model is not dyn.model, "compiled on the dynamic model itself"
    assert not out.is_dynamic()
    assert any("regular copy" in r.getMessage() for r in caplog.records)
    assert harness.rel_err(harness.sample(out), reference()) < 1e-4
    assert before.diff(dyn) == []
    # The copy is SD Accel's alone, so the compiled copy stores its conv weights NHWC; the input's stay as they were.
    conv = lambda m: m.model.diffusion_model.input_blocks[0][0].weight
    assert conv(out).is_contiguous(memory_format=torch.channels_last) and conv(out).dim() == 4
    assert conv(dyn).is_contiguous()
    # Every SD Accel node on the same dynamic model shares one regular copy (one rebuild, shared compiled code).
    again = comfy_adapter.apply_compile(_dynamic_looking(dyn), config)
    assert again.model is out.model


def test_hotswap_and_cast_share_the_copy_and_leave_the_input(comfy_host, dyn, sd15_model, reference, lora_name):
    import folder_paths

    import comfy.model_management

    hl = comfy_host.pack_module("accel_core.hosts.comfy.lora")
    path = folder_paths.get_full_path_or_raise("loras", lora_name)
    (comfy_lora,) = comfy_host.node("LoraLoaderModelOnly").load_lora_model_only(sd15_model, lora_name, 1.0)
    expected = harness.sample(comfy_lora)
    comfy.model_management.unload_all_models()  # ComfyUI's own patches leave the shared weights
    before = Snapshot.of(dyn)
    swapped = hl.apply_hotswap(dyn, path, 1.0)
    assert not swapped.is_dynamic() and swapped.model is not dyn.model
    assert harness.rel_err(harness.sample(swapped), expected) < 2e-3
    (cast,) = comfy_host.node("SDAccelFP16Cast").apply(dyn, "fp32", True, "auto")
    assert not cast.is_dynamic() and cast.get_model_object("diffusion_model") is not dyn.model.diffusion_model
    assert harness.rel_err(harness.sample(cast), reference()) < 1e-4
    assert before.diff(dyn) == []


def test_dynamic_model_that_cannot_be_rebuilt_passes_through(comfy_host, dyn, sd15_checkpoint, caplog):
    dyn = _dynamic_looking(harness.load_checkpoint(sd15_checkpoint))  # a model no SD Accel node has copied yet
    dyn.cached_patcher_init = None  # built in memory, not by a core loader
    for node_id, inputs in (("SDAccelCompileUNet", ("inductor", "default", False, False)), ("SDAccelFP16Cast", ("bf16", True, "auto"))):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sd_accel"):
            (out,) = comfy_host.node(node_id).apply(dyn, *inputs)
        assert out is dyn
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "--disable-dynamic-vram" in warnings[0], warnings


def test_host_without_the_hooks_passes_through(comfy_host, sd15_model, caplog):
    m = sd15_model.clone()
    m.add_wrapper_with_key = None  # a ComfyUI without keyed wrappers
    before = Snapshot.of(m)
    with caplog.at_level(logging.WARNING, logger="sd_accel"):
        for node_id, inputs in (("SDAccelCompileUNet", ("inductor", "default", False, False)), ("SDAccelDeepCache", (3, 0, 0.0, 1.0, "uniform"))):
            (out,) = comfy_host.node(node_id).apply(m, *inputs)
            assert out is m
    assert sum("extension points" in r.getMessage() for r in caplog.records) == 2
    assert before.diff(m) == []
    assert torch.isfinite(harness.sample(m)).all()


def test_hotswap_on_the_compiled_nhwc_copy_matches_comfy_lora(comfy_host, comfy_adapter, accel, dyn, sd15_model, lora_name):
    # The compiled copy's conv weights are NHWC; a fused LoRA delta must land in them all the same.
    import folder_paths

    import comfy.model_management

    hl = comfy_host.pack_module("accel_core.hosts.comfy.lora")
    path = folder_paths.get_full_path_or_raise("loras", lora_name)
    (comfy_lora,) = comfy_host.node("LoraLoaderModelOnly").load_lora_model_only(sd15_model, lora_name, 1.0)
    expected = harness.sample(comfy_lora)
    comfy.model_management.unload_all_models()
    compiled = comfy_adapter.apply_compile(dyn, accel.compile.CompileConfig(backend="inductor", torch_backend="eager"))
    swapped = hl.apply_hotswap(compiled, path, 1.0)
    assert harness.rel_err(harness.sample(swapped), expected) < 2e-3
    assert swapped.model.diffusion_model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
