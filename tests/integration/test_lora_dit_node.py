"""The LoRA Hot-Swap node on the DiT families in a real ComfyUI, sampled through KSampler's path:
the same latent as ComfyUI's LoraLoaderModelOnly, the exact original weights back once another
clone samples, and no recompile when the LoRA changes on a compiled model (the families'
regional compile, dynamo's "eager" backend)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import comfy_harness as harness
import dit_models
import dit_tiny

FORMAT = {"flux": "diffusers", "qwen_image": "diffusers", "zimage": "kohya", "wan": "lightx2v", "ltx": "comfy",
          "ltx2": "comfy", "minimax": "comfy"}  # ComfyUI reads no diffusers LTX or MiniMax names


@pytest.fixture(scope="module")
def hl(comfy_host):
    return comfy_host.pack_module("accel_core.hosts.comfy.lora")


@pytest.fixture(scope="module")
def setup(comfy_host, tmp_path_factory):
    """family -> (MODEL, its eager sample, {name: LoRA path})."""
    tmp = tmp_path_factory.mktemp("dit_lora")
    out = {}
    for fam in dit_models.FAMILIES:
        if dit_models.available(fam) is not None:
            continue
        m = dit_tiny.tiny_model(fam)
        paths = {}
        for name, fmt, seed in (("a", FORMAT[fam], 1), ("b", "kohya", 2)):
            p = tmp / f"{fam}_{name}.safetensors"
            save_file(dit_tiny.make_lora(m, fam, fmt, seed=seed, rank=4), str(p))
            paths[name] = str(p)
        out[fam] = (m, dit_tiny.sample(m, fam), paths)
    return out


def _get(setup, fam):
    if fam not in setup:
        pytest.skip(dit_models.available(fam))
    return setup[fam]


def _loraloader(model, path, strength):
    import comfy.sd
    import comfy.utils

    return comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(path, safe_load=True), strength, 0)[0]


@pytest.mark.parametrize("fam", dit_models.FAMILIES)
def test_node_samples_like_loraloader_and_restores(comfy_host, hl, setup, fam):
    model, base, paths = _get(setup, fam)
    before = dit_tiny.weights(model)
    ref = dit_tiny.sample(_loraloader(model, paths["a"], 0.8), fam)
    assert harness.rel_err(ref, base) > 1e-3  # the LoRA changes the result
    ours = dit_tiny.sample(hl.apply_hotswap(model, paths["a"], 0.8), fam)
    assert harness.rel_err(ours, ref) < 1e-4
    assert torch.equal(dit_tiny.sample(model, fam), base)  # the plain model: original weights back
    after = dit_tiny.weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("fam", dit_models.FAMILIES)
def test_swaps_on_the_compiled_model_do_not_recompile(comfy_host, hl, comfy_adapter, accel, setup, fam):
    from torch._dynamo.utils import counters

    model, base, paths = _get(setup, fam)
    torch._dynamo.reset()
    counters.clear()
    compiled = comfy_adapter.apply_compile(model, accel.compile.CompileConfig(torch_backend="eager"))
    a = dit_tiny.sample(hl.apply_hotswap(compiled, paths["a"], 0.8), fam)
    graphs = int(counters["stats"]["unique_graphs"])
    assert graphs >= 1
    b = dit_tiny.sample(hl.apply_hotswap(compiled, paths["b"], 1.0), fam)
    ab = dit_tiny.sample(hl.apply_hotswap(hl.apply_hotswap(compiled, paths["a"], 0.4), paths["b"], 0.5), fam)
    plain = dit_tiny.sample(compiled, fam)
    assert int(counters["stats"]["unique_graphs"]) == graphs, "a LoRA swap recompiled"
    assert not counters["recompiles"], dict(counters["recompiles"])
    assert harness.rel_err(a, dit_tiny.sample(_loraloader(model, paths["a"], 0.8), fam)) < 1e-4
    assert harness.rel_err(a, b) > 1e-3 and harness.rel_err(b, ab) > 1e-3
    assert harness.rel_err(plain, base) < 1e-4


@pytest.mark.parametrize("fam", dit_models.FAMILIES)
def test_loraloader_after_compile_does_not_recompile(comfy_host, comfy_adapter, accel, setup, fam):
    """ComfyUI's own LoRA on the compiled clone: new Parameters in the patched places (Compile sets no
    weight_inplace_update), read by the compiled blocks as inputs. Built as ComfyUI 0.33 builds every
    model: in inference mode (its executor), requires_grad off (BaseModel); where a model's parameters
    require grad, Compile copies patches in place instead (test_comfy_compile_api.py)."""
    from torch._dynamo.utils import counters

    _, _, paths = _get(setup, fam)
    with torch.inference_mode():
        model = dit_tiny.tiny_model(fam, seed=7)
        model.model.diffusion_model.requires_grad_(False)
    base = dit_tiny.sample(model, fam)
    torch._dynamo.reset()
    compiled = comfy_adapter.apply_compile(model, accel.compile.CompileConfig(torch_backend="eager"))
    assert compiled.weight_inplace_update is False
    dit_tiny.sample(compiled, fam)
    graphs = int(counters["stats"]["unique_graphs"])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name, strength in (("a", 0.8), ("b", 1.0), (None, 0.0), ("a", -0.5)):
            want = base if name is None else dit_tiny.sample(_loraloader(model, paths[name], strength), fam)
            got = dit_tiny.sample(compiled if name is None else _loraloader(compiled, paths[name], strength), fam)
            assert harness.rel_err(got, want) < 1e-4, (name, strength)
            assert harness.rel_err(dit_tiny.sample(model, fam), base) < 1e-4, "LoRA weights stuck on the plain model"
    assert int(counters["stats"]["unique_graphs"]) == graphs
    torch._dynamo.reset()
