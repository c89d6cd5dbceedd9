"""hosts/comfy/native.py's probes on a real ComfyUI tree: the host's own classes, switches and patcher.

On the CPU nothing is captured, so these check what the probes read: the real model classes'
code (does it opt in to ComfyUI's CUDA graphs / compiler?), the real `comfy.cli_args.args`
switches, and a real ModelPatcher (load device, `is_dynamic()`, the model's
`get_dynamic_vram__units()`). Models are empty instances of the real classes: only their type and
the per-model graph switch are read, so no weights are built. The GPU run that checks a capture
actually happens is tests/gpu/comfy_native.py.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

# Real diffusion classes SD Accel registers families for (and MiniMax H3, the compiler's first user).
DIFFUSION = [("comfy.ldm.modules.diffusionmodules.openaimodel", "UNetModel"), ("comfy.ldm.flux.model", "Flux"),
             ("comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel"), ("comfy.ldm.lumina.model", "NextDiT"),
             ("comfy.ldm.wan.model", "WanModel"), ("comfy.ldm.minimax.model", "MiniMaxH3Model"), ("comfy.ldm.lightricks.model", "LTXVModel")]


@pytest.fixture(scope="module")
def cn(comfy_host):
    return comfy_host.pack_module("accel_core.hosts.comfy.native")


def _empty(cls):
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    return m


class _Base(nn.Module):
    """Stands where BaseModel stands; names its units the way 0.33's text-encoder wrappers do (by delegation)."""

    def __init__(self, dm):
        super().__init__()
        self.diffusion_model = dm

    def get_dynamic_vram__units(self):
        units = getattr(self.diffusion_model, "get_dynamic_vram__units", None)
        return units() if units is not None else ([], [])


def _patcher(dm, device="cuda", dynamic=True):
    import comfy.model_patcher

    m = comfy.model_patcher.ModelPatcher(_Base(dm), load_device=torch.device(device), offload_device=torch.device("cpu"))
    if dynamic:
        m.is_dynamic = lambda: True  # ComfyUI's dynamic patcher needs CUDA; its switch is what the probe reads
    return m


def _has_prefetch() -> bool:
    try:
        importlib.import_module("comfy.model_prefetch")
        return True
    except ImportError:
        return False


def _decoder(graph_switch: bool):
    """An empty 0.33 Llama2_ (the decoder that passes core=/enable_graph=) with one layer and its graph switch."""
    import comfy.text_encoders.llama as llama

    dm = _empty(llama.Llama2_)
    dm.layers = nn.ModuleList([nn.Linear(2, 2)])
    dm.graph_dynamic_vbar_blocks = graph_switch  # what MiniMax Music / ACE 1.5 AR set on their decoder
    return dm


@pytest.mark.parametrize("module,name", DIFFUSION, ids=[n for _, n in DIFFUSION])
def test_diffusion_models_are_left_to_sd_accel(cn, module, name):
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.skip(f"this ComfyUI has no {module}.{name}")
    state = cn.native_compile_state(_patcher(_empty(cls)))
    assert state == cn.NativeState(), f"{name}: {state}"
    assert all(not cn.decide(f, state).step_aside for f in ("compile", "deepcache", "lora", "cast", "lcm"))


def test_decoder_graphs_read_the_real_switches(cn, monkeypatch):
    if not _has_prefetch():
        pytest.skip("this ComfyUI has no comfy/model_prefetch.py (no native CUDA graphs)")
    import comfy.model_prefetch
    from comfy.cli_args import args

    if hasattr(comfy.model_prefetch, "malloc_graph_enabled"):
        pytest.skip("this ComfyUI has the Comfy Compiler: graphs follow it (tests/unit/test_comfy_native.py)")
    on = cn.native_compile_state(_patcher(_decoder(True)))
    assert on.cuda_graphs and not on.comfy_compiler and "Llama2_" in on.note
    d = cn.decide("compile", on)
    assert d.step_aside and "--disable-cuda-graphs" in d.note
    assert not cn.native_compile_state(_patcher(_decoder(False))).cuda_graphs  # the model's own switch
    assert not cn.native_compile_state(_patcher(_decoder(True), dynamic=False)).cuda_graphs
    assert not cn.native_compile_state(_patcher(_decoder(True), device="cpu")).cuda_graphs
    monkeypatch.setattr(args, "disable_cuda_graphs", True)
    assert not cn.native_compile_state(_patcher(_decoder(True))).cuda_graphs


def test_host_without_native_compilation(cn):
    if _has_prefetch():
        pytest.skip("this ComfyUI has comfy/model_prefetch.py")
    import comfy.ldm.modules.diffusionmodules.openaimodel as oai

    state = cn.native_compile_state(_patcher(_empty(oai.UNetModel)))
    assert state == cn.NativeState() and cn.decide("compile", state) == cn.Decision(False, "")
