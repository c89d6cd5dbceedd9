"""LoRA Hot-Swap node against a real ComfyUI (COMFYUI_PATH): same output as LoraLoader, clones
kept apart, ComfyUI's own patches untouched, zero recompiles on a compiled model, clear errors.

The deltas stay fused while the clone that asked for them stays the loaded patcher (as ComfyUI's
own LoRA patches do): the tests check that the next run of it writes nothing, and that every way
the clone stops being the loaded one (another clone samples, unload, the clone is dropped)
restores the exact original weights before anything else sees them."""
from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch
from safetensors.torch import save_file

import comfy_harness as harness
from testkit.loras import make_random_lora  # seeded random LoRAs in the real key formats

TINY_SD15 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
                 transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
                 context_dim=768, use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False,
                 num_head_channels=16, adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False)


@pytest.fixture(scope="module")
def lora(comfy_host):
    return comfy_host.pack_module("accel_core.lora")


@pytest.fixture(scope="module")
def hl(comfy_host):
    return comfy_host.pack_module("accel_core.hosts.comfy.lora")


@pytest.fixture(scope="module")
def tiny(comfy_host):
    """A small SD1.5-layout MODEL (all block kinds, 2 levels) for the many-sampling tests."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    mc = comfy.supported_models.SD15(dict(TINY_SD15))
    mc.set_inference_dtype(torch.float32, None)
    bm = mc.get_model({}, "", device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return comfy.model_patcher.ModelPatcher(bm, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


@pytest.fixture(scope="module")
def tiny_loras(tiny, lora, tmp_path_factory):
    """Three LoRA files for the tiny model, in three real key formats, registered in ComfyUI's loras folder.

    ComfyUI's LoraLoader drops PEFT attention keys on SD1.x/SDXL (its key map has no `to_q.lora_A`
    names; it logs "lora key not loaded"), so its reference for "c" is the same LoRA in kohya keys.
    """
    import folder_paths

    folder = tmp_path_factory.mktemp("tiny_loras")
    unet = tiny.model.diffusion_model
    files = {}
    for name, fmt, seed, scope in (("a", "kohya-diffusers", 1, "all"), ("b", "kohya-ldm", 2, "attn"), ("c", "peft", 3, "all"),
                                   ("c_kohya", "kohya-diffusers", 3, "all")):
        path = folder / f"tiny_{name}.safetensors"
        save_file(make_random_lora(unet, fmt, rank=4, seed=seed, scope=scope, magnitude=1.0), str(path))
        files[name] = str(path)
    folder_paths.add_model_folder_path("loras", str(folder))
    return files


def _comfy_lora(model, path, strength):
    """ComfyUI's own LoRA path (what LoraLoaderModelOnly does)."""
    import comfy.sd
    import comfy.utils

    return comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(path, safe_load=True), strength, 0)[0]


def _weights(model):
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def _same_weights(model, ref):
    now = model.model.diffusion_model.state_dict()
    return all(torch.equal(now[k], v) for k, v in ref.items())


def _fused(lora, model) -> dict:
    """param name -> the exact copy hot-swap keeps while its deltas are in the weights (empty: none fused)."""
    return dict(lora.lora_state(model.model.diffusion_model).originals)


def _same_objects(a: dict, b: dict) -> bool:
    # A restore drops the copies and a re-fuse makes new ones: same objects = no weight was written.
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


def test_nodes_are_registered_with_descriptions_and_tooltips(comfy_host):
    for node_id in ("SDAccelLoRAHotSwap", "SDAccelLCMLoRASampler"):
        cls = comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id]
        assert cls.DESCRIPTION and cls.OUTPUT_TOOLTIPS
        for name, spec in cls.INPUT_TYPES()["required"].items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_node_output_equals_loraloader_on_sd15(comfy_host, sd15_model, lora_name, reference):
    import folder_paths

    before = harness.Snapshot.of(sd15_model)
    hot = comfy_host.node("SDAccelLoRAHotSwap").apply(sd15_model, lora_name, 0.8)[0]
    assert harness.Snapshot.of(sd15_model).diff(sd15_model) == [] and before.diff(sd15_model) == []
    assert hot.patches_uuid == sd15_model.patches_uuid  # no ComfyUI weight patches: no reload
    out = harness.sample(hot)
    assert torch.equal(harness.sample(sd15_model), reference())  # the plain model samples with its original weights
    assert before.diff(sd15_model) == []  # same Parameter objects, storage and values
    path = folder_paths.get_full_path_or_raise("loras", lora_name)
    want = harness.sample(_comfy_lora(sd15_model, path, 0.8))
    assert harness.rel_err(want, reference()) > 1e-3  # the LoRA matters
    assert harness.rel_err(out, want) < 1e-4


def test_chained_swap_strength_remove(comfy_host, tiny, tiny_loras, caplog):
    ref = harness.sample(tiny)
    w0 = _weights(tiny)
    node = comfy_host.node("SDAccelLoRAHotSwap")
    a = node.apply(tiny, "tiny_a.safetensors", 0.7)[0]
    ab = node.apply(a, "tiny_b.safetensors", -0.4)[0]
    with caplog.at_level(logging.INFO, logger="sd_accel"):
        out_ab = harness.sample(ab)
    assert "tiny_a.safetensors @ 0.7" in caplog.text and "tiny_b.safetensors @ -0.4" in caplog.text and " ms" in caplog.text
    want_ab = harness.sample(_comfy_lora(_comfy_lora(tiny, tiny_loras["a"], 0.7), tiny_loras["b"], -0.4))
    assert harness.rel_err(out_ab, want_ab) < 1e-5 and harness.rel_err(want_ab, ref) > 2e-3
    # swap B for C, change A's strength, then A alone, then back: each equals ComfyUI's own result
    for chain in ((("a", 0.7), ("c", 1.0)), (("a", 0.2),), (("c", 0.5), ("b", 1.0)), (("a", 0.7), ("b", -0.4))):
        hot, want = tiny, tiny
        for name, s in chain:
            hot = node.apply(hot, f"tiny_{name}.safetensors", s)[0]
            want = _comfy_lora(want, tiny_loras[name + "_kohya" if name == "c" else name], s)
        want_out = harness.sample(want)  # ComfyUI leaves its LoRA patched in after this run ...
        assert harness.rel_err(harness.sample(hot), want_out) < 1e-5, chain
        assert not _same_weights(tiny, w0)  # ... and so does hot-swap, until another clone loads
    assert torch.equal(harness.sample(ab), out_ab)
    assert torch.equal(harness.sample(tiny), ref)
    assert _same_weights(tiny, w0)


def test_strength_zero_returns_the_input_model(comfy_host, tiny, tiny_loras):
    assert comfy_host.node("SDAccelLoRAHotSwap").apply(tiny, "tiny_a.safetensors", 0.0)[0] is tiny


@pytest.mark.parametrize("order", ["loraloader_first", "hotswap_first"])
def test_together_with_comfy_loraloader(comfy_host, lora, tiny, tiny_loras, order):
    ref, w0 = harness.sample(tiny), _weights(tiny)
    node = comfy_host.node("SDAccelLoRAHotSwap")
    only_comfy = _comfy_lora(tiny, tiny_loras["a"], 0.6)
    ref_comfy = harness.sample(only_comfy)
    if order == "loraloader_first":
        mixed = node.apply(only_comfy, "tiny_b.safetensors", 0.9)[0]
    else:
        mixed = _comfy_lora(node.apply(tiny, "tiny_b.safetensors", 0.9)[0], tiny_loras["a"], 0.6)
    want = harness.sample(_comfy_lora(_comfy_lora(tiny, tiny_loras["a"], 0.6), tiny_loras["b"], 0.9))
    for _ in range(2):
        assert harness.rel_err(harness.sample(mixed), want) < 1e-5
        # ComfyUI's LoRA patches the same layers: ComfyUI may write its backups over them with
        # no callback first (unload, lowvram), so such runs restore at cleanup, as before.
        assert not _fused(lora, tiny)
        assert torch.equal(harness.sample(only_comfy), ref_comfy)  # ComfyUI's backup never captured our deltas
        assert torch.equal(harness.sample(tiny), ref)
    assert _same_weights(tiny, w0)


@pytest.mark.parametrize("order", ["loraloader_first", "hotswap_first"])
def test_loraloader_on_other_layers_keeps_the_deltas_fused(comfy_host, lora, tiny, tiny_loras, tmp_path, order):
    """ComfyUI's patches on ResBlocks, hot-swap on attention: the deltas stay between runs,
    ComfyUI's backups hold no delta, and an unload undoes both exactly."""
    import comfy.model_management as mm

    sd = make_random_lora(tiny.model.diffusion_model, "kohya-diffusers", rank=4, seed=4, scope="all", magnitude=1.0,
                               with_text_encoder=False)
    res_only = tmp_path / "tiny_res.safetensors"
    save_file({k: v for k, v in sd.items() if "attentions" not in k}, str(res_only))
    ref, w0 = harness.sample(tiny), _weights(tiny)
    node = comfy_host.node("SDAccelLoRAHotSwap")
    only_comfy = _comfy_lora(tiny, str(res_only), 0.8)
    ref_comfy = harness.sample(only_comfy)
    if order == "loraloader_first":
        mixed = node.apply(only_comfy, "tiny_b.safetensors", 0.9)[0]
    else:
        mixed = _comfy_lora(node.apply(tiny, "tiny_b.safetensors", 0.9)[0], str(res_only), 0.8)
    want = harness.sample(_comfy_lora(_comfy_lora(tiny, str(res_only), 0.8), tiny_loras["b"], 0.9))
    out = harness.sample(mixed)
    assert harness.rel_err(out, want) < 1e-5
    fused = _fused(lora, tiny)
    assert fused and not any(r in k for k in fused for r in ("in_layers", "out_layers", "emb_layers", "skip_connection"))
    assert torch.equal(harness.sample(mixed), out) and _same_objects(_fused(lora, tiny), fused)
    assert torch.equal(harness.sample(only_comfy), ref_comfy)
    assert torch.equal(harness.sample(mixed), out)
    mm.unload_all_models()  # ComfyUI restores its layers, then ON_DETACH ours
    assert not _fused(lora, tiny) and _same_weights(tiny, w0)
    assert torch.equal(harness.sample(mixed), out)
    assert torch.equal(harness.sample(tiny), ref) and _same_weights(tiny, w0)


def test_next_run_of_the_same_clone_writes_no_weight(comfy_host, lora, tiny, tiny_loras, caplog):
    ref, w0 = harness.sample(tiny), _weights(tiny)
    node = comfy_host.node("SDAccelLoRAHotSwap")
    hot = node.apply(node.apply(tiny, "tiny_a.safetensors", 0.7)[0], "tiny_b.safetensors", -0.4)[0]
    out = harness.sample(hot)
    fused = _fused(lora, tiny)
    params = dict(tiny.model.diffusion_model.named_parameters())
    assert fused and not _same_weights(tiny, w0)
    with caplog.at_level(logging.DEBUG, logger="sd_accel"):
        assert torch.equal(harness.sample(hot), out)
    assert "already applied" in caplog.text and "weights updated in place" not in caplog.text
    assert _same_objects(_fused(lora, tiny), fused)
    assert all(p is params[n] for n, p in tiny.model.diffusion_model.named_parameters())
    # A clone with the same set over the same ComfyUI patches (what a ModelSamplingDiscrete node
    # makes of it) takes over without writing; the former owner going then changes nothing.
    same = hot.clone()
    assert torch.equal(harness.sample(same), out)
    assert _same_objects(_fused(lora, tiny), fused)
    del hot
    gc.collect()
    assert _same_objects(_fused(lora, tiny), fused)
    assert torch.equal(harness.sample(same), out)
    assert torch.equal(harness.sample(tiny), ref) and _same_weights(tiny, w0) and not _fused(lora, tiny)


def test_two_hotswap_clones_alternate(comfy_host, lora, tiny, tiny_loras):
    ref = harness.sample(tiny)
    node = comfy_host.node("SDAccelLoRAHotSwap")
    h1, h2 = node.apply(tiny, "tiny_a.safetensors", 0.7)[0], node.apply(tiny, "tiny_b.safetensors", 1.0)[0]
    w1 = harness.sample(_comfy_lora(tiny, tiny_loras["a"], 0.7))
    w2 = harness.sample(_comfy_lora(tiny, tiny_loras["b"], 1.0))
    for _ in range(2):
        assert harness.rel_err(harness.sample(h1), w1) < 1e-5
        assert harness.rel_err(harness.sample(h2), w2) < 1e-5
    assert torch.equal(harness.sample(tiny), ref)


def test_interrupted_run_is_restored_before_the_next_model_loads(comfy_host, lora, tiny, tiny_loras):
    import comfy.patcher_extension as pe

    ref, w0 = harness.sample(tiny), _weights(tiny)
    hot = comfy_host.node("SDAccelLoRAHotSwap").apply(tiny, "tiny_a.safetensors", 1.0)[0]
    want = harness.sample(_comfy_lora(tiny, tiny_loras["a"], 1.0))
    calls = []

    def boom(executor, *args, **kwargs):
        calls.append(1)
        if len(calls) in (2, 6):
            raise RuntimeError("interrupted")
        return executor(*args, **kwargs)

    broken = hot.clone()
    broken.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test.boom", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        harness.sample(broken)
    assert _fused(lora, tiny)  # its clone is still the loaded patcher, as after a finished run
    assert torch.equal(harness.sample(tiny), ref) and _same_weights(tiny, w0)
    assert harness.rel_err(harness.sample(broken), want) < 1e-5  # calls 3-5: a whole run
    with pytest.raises(RuntimeError, match="interrupted"):
        harness.sample(broken)
    assert harness.rel_err(harness.sample(hot), want) < 1e-5
    assert torch.equal(harness.sample(tiny), ref) and _same_weights(tiny, w0)


def test_unload_restores_the_weights(comfy_host, lora, tiny, tiny_loras):
    import comfy.model_management as mm

    ref, w0 = harness.sample(tiny), _weights(tiny)
    hot = comfy_host.node("SDAccelLoRAHotSwap").apply(tiny, "tiny_a.safetensors", 1.0)[0]
    out = harness.sample(hot)
    assert _fused(lora, tiny)
    mm.unload_all_models()  # model_unload -> detach(unpatch_all=True)
    assert not _fused(lora, tiny) and _same_weights(tiny, w0)
    assert torch.equal(harness.sample(hot), out)  # loaded and fused again
    assert torch.equal(harness.sample(tiny), ref)


def test_clone_dropped_while_loaded_restores_the_weights(comfy_host, lora, tiny, tiny_loras):
    import comfy.model_management as mm

    ref, w0 = harness.sample(tiny), _weights(tiny)
    hot = comfy_host.node("SDAccelLoRAHotSwap").apply(tiny, "tiny_a.safetensors", 1.0)[0]
    harness.sample(hot)
    assert _fused(lora, tiny)
    gone = weakref.ref(hot)
    del hot
    gc.collect()
    assert gone() is None
    # ComfyUI made the parent the loaded patcher (LoadedModel._switch_parent), with no detach.
    assert any(lm.model is tiny for lm in mm.current_loaded_models)
    assert not _fused(lora, tiny) and _same_weights(tiny, w0)
    assert torch.equal(harness.sample(tiny), ref)


def test_compiled_model_swaps_without_recompiling(comfy_host, comfy_adapter, tiny, tiny_loras):
    cc = comfy_host.pack_module("accel_core.compiling")
    sets = ([("b", 1.0)], [("b", 0.3)], [("a", 0.5), ("c", 1.0)], [], [("c", -1.0)])
    # LoraLoader's references first: on hosts whose parameters require grad (0.3.64, 0.8.0), a LoraLoader
    # sibling sampled between compiled runs swaps the shared UNet's Parameters (docs/comfy-internals.md),
    # which is ComfyUI's doing, not a hot-swap's; this test is about the swaps.
    refs = []
    for chain in sets:
        eager = tiny
        for name, s in chain:
            eager = _comfy_lora(eager, tiny_loras[name + "_kohya" if name == "c" else name], s)
        refs.append(harness.sample(eager))
    torch._dynamo.reset()
    compiled = comfy_adapter.apply_compile(tiny, cc.CompileConfig(torch_backend="eager"))
    node = comfy_host.node("SDAccelLoRAHotSwap")
    harness.sample(node.apply(compiled, "tiny_a.safetensors", 1.0)[0])  # compiles once
    report = comfy_adapter.compile_report(compiled)
    assert report and report["status"] in ("compiled", "partial"), report
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for chain, ref in zip(sets, refs):
            hot = compiled
            for name, s in chain:
                hot = node.apply(hot, f"tiny_{name}.safetensors", s)[0]
            assert harness.rel_err(harness.sample(hot), ref) < 1e-5, chain
    # Compile falls back per block when dynamo raises (error_on_recompile included), so results alone
    # would not show a recompile: count the graphs, and the report must still be the first one.
    assert counters["stats"]["unique_graphs"] == graphs, "a LoRA swap compiled a new graph"
    assert comfy_adapter.compile_report(compiled)["status"] == report["status"]
    torch._dynamo.reset()


def test_cast_model_with_hotswap(comfy_cast, comfy_host, comfy_adapter, tiny, tiny_loras):
    castmod = comfy_host.pack_module("accel_core.casting")
    cast = comfy_cast.apply_cast(tiny, castmod.CastConfig(dtype="bf16", channels_last=True))
    ref_cast = harness.sample(cast)
    hot = comfy_host.node("SDAccelLoRAHotSwap").apply(cast, "tiny_a.safetensors", 3.0)[0]
    out = harness.sample(hot)
    want = harness.sample(_comfy_lora(tiny, tiny_loras["a"], 3.0))  # fp32 reference
    # bf16 weights: not equal, but far closer to the LoRA'd output than the cast model without it
    assert harness.rel_err(out, want) < harness.rel_err(ref_cast, want) / 3
    assert torch.equal(harness.sample(cast), ref_cast)
    assert next(cast.get_model_object("diffusion_model").parameters()).dtype == torch.bfloat16


def test_cast_copies_the_original_weights_while_deltas_are_fused(comfy_cast, comfy_host, comfy_adapter, lora, tiny, tiny_loras):
    castmod = comfy_host.pack_module("accel_core.casting")
    config = castmod.CastConfig(dtype="bf16")
    harness.sample(tiny)  # nothing fused
    clean = comfy_cast.apply_cast(tiny, config)
    node = comfy_host.node("SDAccelLoRAHotSwap")
    hot = node.apply(tiny, "tiny_a.safetensors", 3.0)[0]
    harness.sample(hot)
    fused = _fused(lora, tiny)
    assert fused
    want = clean.get_model_object("diffusion_model").state_dict()
    for m in (tiny, hot):  # the plain model and the hot-swap clone, both over the fused UNet
        cast = comfy_cast.apply_cast(m, config)
        got = cast.get_model_object("diffusion_model").state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())
    assert _same_objects(_fused(lora, tiny), fused)  # building the casts changed nothing
    hot_cast = comfy_cast.apply_cast(hot, config)
    assert torch.equal(harness.sample(hot_cast), harness.sample(node.apply(clean, "tiny_a.safetensors", 3.0)[0]))


def test_comfy_lora_after_cast_patches_the_copy(comfy_cast, comfy_host, tiny, tiny_loras):
    # The cast UNet is an object patch: ComfyUI loads and patches it with the clone, from a loaded
    # shared UNet too (its load markers must not carry over), and unpatches it afterwards.
    castmod = comfy_host.pack_module("accel_core.casting")
    harness.sample(tiny)  # the shared UNet is loaded and marked as patched by ComfyUI
    before = harness.Snapshot.of(tiny)
    cast = comfy_cast.apply_cast(tiny, castmod.CastConfig(dtype="bf16", channels_last=False))
    out = harness.sample(_comfy_lora(cast, tiny_loras["a"], 3.0))  # the copy's first load carries ComfyUI's patches
    ref_cast = harness.sample(cast)
    assert torch.equal(harness.sample(_comfy_lora(cast, tiny_loras["a"], 3.0)), out)
    assert torch.equal(harness.sample(cast), ref_cast)  # the LoRA'd clone's patches left the copy
    assert before.diff(tiny) == []  # and never touched the shared UNet
    want = harness.sample(_comfy_lora(tiny, tiny_loras["a"], 3.0))  # fp32 reference
    assert harness.rel_err(out, want) < harness.rel_err(ref_cast, want) / 3


# --- bad input ------------------------------------------------------------------------------------

def test_sdxl_lora_on_sd15_names_the_match_count(comfy_host, hl, lora, sd15_model, tmp_path):
    import comfy.supported_models

    from comfy_harness import SD15_UNET_CONFIG  # noqa: F401

    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
           "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
           "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
           "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
           "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False, "use_temporal_resblock": False}
    mc = comfy.supported_models.SDXL(cfg)
    mc.set_inference_dtype(torch.float32, None)
    with torch.device("meta"):
        xl = mc.get_model({}, "", device=torch.device("meta")).diffusion_model
    path = tmp_path / "sdxl_style.safetensors"
    save_file(make_random_lora(xl, "kohya-ldm", rank=1, dtype=torch.float16), str(path))
    before = harness.Snapshot.of(sd15_model)
    with pytest.raises(Exception) as e:
        hl.apply_hotswap(sd15_model, str(path), 1.0)
    assert type(e.value).__name__ == "SDAccelError"
    msg = str(e.value)
    assert "sdxl_style.safetensors does not fit" in msg and " layers matched" in msg and "SD1.x UNet" in msg
    assert before.diff(sd15_model) == []


def test_bad_files(comfy_host, hl, tiny, tmp_path):
    w0 = _weights(tiny)
    txt = tmp_path / "broken.safetensors"
    txt.write_bytes(b"\x00" * 64)
    for path, msg in ((tmp_path / "missing.safetensors", "does not exist"), (txt, "not a readable safetensors")):
        with pytest.raises(Exception, match=msg) as e:
            hl.apply_hotswap(tiny, str(path), 1.0)
        assert type(e.value).__name__ == "SDAccelError"
    assert _same_weights(tiny, w0)


# --- key mapping against ComfyUI's own tables -----------------------------------------------------

@pytest.mark.parametrize("arch", ["SD15", "SDXL"])
def test_every_comfy_lora_key_maps_to_the_same_weight(comfy_host, lora, arch):
    import re
    import inspect

    import comfy.lora
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

    src = inspect.getsource(comfy.model_detection.unet_config_from_diffusers_unet)
    cfg = eval(re.search(r"\n    %s = (\{.*?\})\n" % arch, src, re.S).group(1), {"torch": torch, "dtype": torch.float32})
    mc = getattr(comfy.supported_models, arch)(cfg)
    mc.set_inference_dtype(torch.float32, None)
    with torch.device("meta"):
        bm = mc.get_model({}, "", device=torch.device("meta"))
    targets = lora.lora_state(bm.diffusion_model).targets
    key_map = comfy.lora.model_lora_keys_unet(bm, {})
    checked = 0
    for k, v in key_map.items():
        v = v[len("diffusion_model."):]
        if v in targets.shapes:
            assert targets.lookup(k) == (v, None), k
            checked += 1
    assert checked > {"SD15": 1500, "SDXL": 4500}[arch]
    names = lora.UNetNames(bm.diffusion_model)
    for d, l in comfy.utils.unet_to_diffusers(mc.unet_config).items():
        if d.endswith(".weight") and not d.startswith("class_embedding"):
            try:
                bm.diffusion_model.get_submodule(l[:-7])
            except AttributeError:
                continue
            assert names.other(l[: -len(".weight")]) == d[: -len(".weight")]


def test_fp16_fused_weights_equal_comfy_lora_weights(comfy_host, lora, tiny_loras):
    """In fp16, what a user's GPU runs, the fused weights equal ComfyUI's own patched weights to
    within one fp16 rounding step: outputs of the two paths can differ only by rounding, as
    ComfyUI's own LoRA paths (patched weights, per-call patches) differ from each other."""
    import copy

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    mc = comfy.supported_models.SD15(dict(TINY_SD15))
    mc.set_inference_dtype(torch.float16, None)
    bm = mc.get_model({}, "", device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    assert next(bm.diffusion_model.parameters()).dtype == torch.float16
    model = comfy.model_patcher.ModelPatcher(bm, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    path = tiny_loras["a"]
    theirs_model = _comfy_lora(model, path, 0.8)
    theirs_model.patch_model(device_to=torch.device("cpu"), force_patch_weights=True)
    try:
        theirs = {k: v.detach().clone() for k, v in bm.diffusion_model.state_dict().items()}
    finally:
        theirs_model.unpatch_model(device_to=torch.device("cpu"))
    ours_unet = copy.deepcopy(bm.diffusion_model)
    report = lora.apply_loras(ours_unet, [lora.LoraSpec(path, 0.8)])
    assert report.layers_changed > 10
    ours = ours_unet.state_dict()
    changed = [k for k in theirs if not torch.equal(theirs[k], model.model.diffusion_model.state_dict()[k])]
    assert len(changed) == report.layers_changed  # the same layers changed
    for k in changed:
        a, b = ours[k].float(), theirs[k].float()
        ulp = torch.finfo(torch.float16).eps * torch.maximum(a.abs(), b.abs()).clamp_min(2 ** -14)
        assert ((a - b).abs() <= ulp).all(), k  # at most one fp16 rounding step apart
        assert (a == b).float().mean() > 0.99, k  # and nearly all bit for bit
    mm.soft_empty_cache()
