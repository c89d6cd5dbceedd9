"""LCM-LoRA Sampler node against a real ComfyUI (COMFYUI_PATH): equals the manual LoraLoader +
ModelSamplingDiscrete(lcm) + KSampler(lcm, sgm_uniform) path; compiled, cast and DeepCache'd models;
re-executing it (new seed, cfg, denoise) samples the same clone, so its LoRA is not fused again."""
from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch
from safetensors.torch import save_file

import comfy_harness as harness
from testkit.loras import make_random_lora  # seeded random LoRAs in the real key formats
from test_lora_hotswap import TINY_SD15  # noqa: F401  (same tiny layout)


@pytest.fixture(scope="module")
def tiny(comfy_host):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    mc = comfy.supported_models.SD15(dict(TINY_SD15))
    mc.set_inference_dtype(torch.float32, None)
    bm = mc.get_model({}, "", device=torch.device("cpu"))
    g = torch.Generator().manual_seed(10)
    with torch.no_grad():
        for p in bm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return comfy.model_patcher.ModelPatcher(bm, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


@pytest.fixture(scope="module")
def lcm_lora(comfy_host, tiny, tmp_path_factory):
    """A random "LCM-LoRA" in the key format the real lcm-lora-sdv1-5 file uses (kohya keys, diffusers names)."""
    import folder_paths

    lora = comfy_host.pack_module("accel_core.lora")
    folder = tmp_path_factory.mktemp("lcm_loras")
    path = folder / "tiny_lcm_lora.safetensors"
    save_file(make_random_lora(tiny.model.diffusion_model, "kohya-diffusers", rank=8, seed=11, scope="all", magnitude=1.0), str(path))
    folder_paths.add_model_folder_path("loras", str(folder))
    return "tiny_lcm_lora.safetensors", str(path)


def _node(comfy_host, model, name, steps=4, cfg=1.5, denoise=1.0, strength=1.0, case=harness.TXT2IMG, seed=5, unique_id=None,
          node=None):
    pos, neg = harness.conditioning()
    node = node or comfy_host.node("SDAccelLCMLoRASampler")  # one object per graph node; pass it to re-execute
    with torch.inference_mode():
        out = node.sample(model, pos, neg, case.latent(), name, strength, seed, steps, cfg, denoise, unique_id=unique_id)
    return out[0]["samples"].clone()


def _manual(comfy_host, model, path, steps=4, cfg=1.5, denoise=1.0, strength=1.0, case=harness.TXT2IMG, seed=5):
    import comfy.sd
    import comfy.utils
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    m = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(path, safe_load=True), strength, 0)[0]
    m = ModelSamplingDiscrete().patch(m, "lcm", False)[0]
    pos, neg = harness.conditioning()
    with torch.inference_mode():
        out = comfy_host.nodes.common_ksampler(m, seed, steps, cfg, "lcm", "sgm_uniform", pos, neg, case.latent(), denoise=denoise)
    return out[0]["samples"].clone()


@pytest.mark.parametrize("case,steps,cfg", [(harness.TXT2IMG, 4, 1.5), (harness.TXT2IMG, 2, 1.0), (harness.IMG2IMG, 4, 1.5)])
def test_node_equals_manual_lcm_path(comfy_host, tiny, lcm_lora, case, steps, cfg):
    name, path = lcm_lora
    ref = harness.sample(tiny)
    before = harness.Snapshot.of(tiny)
    out = _node(comfy_host, tiny, name, steps=steps, cfg=cfg, denoise=case.denoise, case=case)
    # The LoRA stays fused while the node's clone is the loaded model; the input model loads
    # with its own weights (same Parameter objects and storage), wrappers and options.
    assert torch.equal(harness.sample(tiny), ref)
    assert before.diff(tiny) == []
    want = _manual(comfy_host, tiny, path, steps=steps, cfg=cfg, denoise=case.denoise, case=case)
    assert harness.rel_err(out, want) < 1e-5


def test_core_sampler_matches_comfy(comfy_host, tiny):
    """accel_core.lcm.lcm_sample (used by the bench and non-ComfyUI hosts) against ComfyUI's LCM sampling."""
    import comfy.sample
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    lcm = comfy_host.pack_module("accel_core.lcm")
    pos, neg = harness.conditioning()
    latent = harness.TXT2IMG.latent()
    import inspect

    import comfy.k_diffusion.sampling as kds

    m = ModelSamplingDiscrete().patch(tiny, "lcm", False)[0]
    # ComfyUI >= 0.4 seeds the per-step noise with seed + 1 on the CPU (so it differs from the initial noise)
    step_seed = 9 + (1 if "seed += 1" in inspect.getsource(kds.default_noise_sampler) else 0)
    with torch.inference_mode():
        want = comfy_host.nodes.common_ksampler(m, 9, 4, 1.5, "lcm", "sgm_uniform", pos, neg, latent)[0]["samples"]
        noise = comfy.sample.prepare_noise(latent["samples"], 9)
        unet = tiny.model.diffusion_model
        got = lcm.lcm_sample(lambda x, t, c: unet(x, t, context=c), noise, lcm.LcmConfig(steps=4, cfg=1.5),
                             cond=pos[0][0], uncond=neg[0][0], seed=step_seed)
    want = m.model.process_latent_in(want)  # ComfyUI returns latents divided by the VAE scale factor
    assert harness.rel_err(got, want) < 1e-4


def test_compiled_and_cast_models(comfy_cast, comfy_host, comfy_adapter, tiny, lcm_lora):
    name, path = lcm_lora
    cc = comfy_host.pack_module("accel_core.compiling")
    castmod = comfy_host.pack_module("accel_core.casting")
    eager = _node(comfy_host, tiny, name)
    torch._dynamo.reset()
    compiled = comfy_adapter.apply_compile(tiny, cc.CompileConfig(torch_backend="eager"))
    assert harness.rel_err(_node(comfy_host, compiled, name), eager) < 1e-5
    want = _node(comfy_host, tiny, name, strength=0.5)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):  # new strength: fused in place, no recompile
        assert harness.rel_err(_node(comfy_host, compiled, name, strength=0.5), want) < 1e-5
    assert counters["stats"]["unique_graphs"] == graphs  # counted: a recompile error would fall back per block
    torch._dynamo.reset()
    cast = comfy_cast.apply_cast(tiny, castmod.CastConfig(dtype="bf16"))
    out = _node(comfy_host, cast, name)
    assert torch.isfinite(out).all() and harness.rel_err(out, eager) < 5e-2


def test_deepcache_switches_itself_off_for_short_runs(comfy_host, tiny, lcm_lora, caplog):
    name, _ = lcm_lora
    dc = comfy_host.pack_module("accel_core.deepcaching")
    hdc = comfy_host.pack_module("accel_core.hosts.comfy.deepcache")
    cached = hdc.apply_deepcache(tiny, dc.DeepCacheConfig(cache_interval=3))
    plain = _node(comfy_host, tiny, name, steps=4)
    with caplog.at_level(logging.INFO, logger="sd_accel"):
        out = _node(comfy_host, cached, name, steps=4)
    off = [r for r in caplog.records if "DeepCache is off for this 4-step run" in r.getMessage()]
    assert len(off) == 1
    assert not any(r.getMessage().startswith("SD Accel DeepCache: reused") for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert torch.equal(out, plain)
    assert cached.model_options["transformer_options"].get("sd_accel.deepcache") is not None  # the input keeps it
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sd_accel"):
        long = _node(comfy_host, cached, name, steps=12)
    assert not any("DeepCache is off" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage().startswith("SD Accel DeepCache: reused") for r in caplog.records)
    assert torch.isfinite(long).all()


def test_reexecution_samples_the_same_clone(comfy_host, tiny, lcm_lora, caplog):
    import comfy.model_management as mm

    name, path = lcm_lora
    hl = comfy_host.pack_module("accel_core.hosts.comfy.lcm")
    lora = comfy_host.pack_module("accel_core.lora")
    unet = tiny.model.diffusion_model
    ref = harness.sample(tiny)
    inp = tiny.clone()  # an input MODEL this test can drop (a node upstream of the sampler)
    node = comfy_host.node("SDAccelLCMLoRASampler")  # the executor keeps one object per graph node
    first = _node(comfy_host, inp, name, seed=5, unique_id="9", node=node)
    fused = dict(lora.lora_state(unet).originals)
    assert fused
    with caplog.at_level(logging.DEBUG, logger="sd_accel"):  # new seed, cfg, denoise: nothing to fuse again
        _node(comfy_host, inp, name, seed=6, cfg=1.2, denoise=0.8, case=harness.IMG2IMG, unique_id="9", node=node)
    assert "already applied" in caplog.text and "weights updated in place" not in caplog.text
    now = lora.lora_state(unet).originals
    assert now.keys() == fused.keys() and all(now[k] is fused[k] for k in fused)
    assert torch.equal(_node(comfy_host, inp, name, seed=5, unique_id="9", node=node), first)
    clones = node.clones
    clone = clones.get(inp, path, 1.0, 4, "9")
    assert clones.get(inp, path, 1.0, 12, "9") is clone  # steps matter only through DeepCache (none here)
    assert clones.get(inp, path, 0.5, 4, "9") is not clone and hl.LcmClones().get(inp, path, 1.0, 4, "9") is not clone
    assert clone.model_options["transformer_options"]["sd_accel.nodes"] == {"lcm": "9"}
    assert "sd_accel.nodes" not in inp.model_options.get("transformer_options", {})  # the input is not tracked
    chain, p = [], clone
    while p is not None and p is not inp:
        chain.append(p)
        p = p.parent
    assert p is inp and len(chain) <= 4  # parents stay as clone() set them: the chain leads back to the input
    # The clones go with the node, by reference counting (no cycle), and the loaded clone's
    # LoRA with them; ComfyUI's loaded-model entry moves to a live parent.
    gone = weakref.ref(inp), weakref.ref(clone)
    del inp, clone, clones, node, chain, p
    assert all(r() is None for r in gone)
    assert not lora.lora_state(unet).originals
    # Only this model's entries: another test's dropped model may leave a dead entry of its own.
    ours = [lm for lm in mm.current_loaded_models if lm.real_model is not None and lm.real_model() is tiny.model]
    assert ours and not any(lm.is_dead() for lm in ours)
    gc.collect()
    assert torch.equal(harness.sample(tiny), ref)


def test_bad_input(comfy_host, tiny, lcm_lora):
    name, _ = lcm_lora
    with pytest.raises(Exception, match="steps must be") as e:
        _node(comfy_host, tiny, name, steps=0)
    assert type(e.value).__name__ == "SDAccelError"
