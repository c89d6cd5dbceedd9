"""Step Cache stacked with Compile and LoRA Hot-Swap in a real ComfyUI (COMFYUI_PATH), on reduced Flux,
Wan, LTX-Video, LTX-2 and MiniMax H3 models of ComfyUI's own classes: Compile Model -> Step Cache -> LoRA Hot-Swap, the LoRA
swapped between runs. Each run equals the same Step Cache over ComfyUI's LoraLoader (uncompiled), no
swap recompiles (dynamo's "eager" backend, as the other CPU compile tests), and the plain model's
weights come back bit for bit."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import comfy_harness as harness
import dit_models
import dit_tiny

FAMS = ("flux", "wan", "ltx", "ltx2", "minimax")
STEPS, INTERVAL = 5, 2  # full calls at steps 0, 2, 4; cached at 1, 3
FORMAT = {"flux": "diffusers", "wan": "lightx2v", "ltx": "comfy", "ltx2": "comfy", "minimax": "comfy"}


@pytest.fixture(scope="module")
def loras(comfy_host, tmp_path_factory):
    """A tmp `loras` folder ComfyUI lists, with two LoRAs per family."""
    import folder_paths

    folder = tmp_path_factory.mktemp("stepcache_loras")
    for fam in FAMS:
        if dit_models.available(fam) is not None:
            continue
        m = dit_tiny.tiny_model(fam)
        for name, fmt, seed in (("a", FORMAT[fam], 1), ("b", "kohya", 2)):
            save_file(dit_tiny.make_lora(m, fam, fmt, seed=seed, rank=4), str(folder / f"sc_{fam}_{name}.safetensors"))
    folder_paths.add_model_folder_path("loras", str(folder))
    return folder


def _step_cache(host, model, mode):
    return host.node("SDAccelStepCache").apply(model, mode, INTERVAL, 1, 0, 0.1, 3, 0.0, 1.0, "separate")[0]


def _hotswap(host, model, name, strength):
    return host.node("SDAccelLoRAHotSwap").apply(model, name, strength)[0]


def _loraloader(model, folder, name, strength):
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(folder / name), safe_load=True)
    return comfy.sd.load_lora_for_models(model, None, sd, strength, 0)[0]


@pytest.mark.parametrize("fam", FAMS)
def test_compile_step_cache_and_hotswap_stack_like_loraloader_without_recompiles(comfy_host, comfy_adapter, accel, loras, fam):
    from torch._dynamo.utils import counters

    if dit_models.available(fam) is not None:
        pytest.skip(dit_models.available(fam))
    events = comfy_host.pack_module("accel_core.events")
    stats = []

    def listen(event, data):
        if event == "stepcache_stats":
            stats.append(data)

    model = dit_tiny.tiny_model(fam)
    before = dit_tiny.weights(model)
    names = {k: f"sc_{fam}_{k}.safetensors" for k in "ab"}
    runs = (("a", 0.8, "forecast"), ("b", 1.0, "forecast"), ("a", 0.5, "fixed"))
    refs = [dit_tiny.sample(_step_cache(comfy_host, _loraloader(model, loras, names[k], s), mode), fam, steps=STEPS, cfg=2.0)
            for k, s, mode in runs]
    assert harness.rel_err(refs[0], refs[1]) > 1e-3  # the two LoRAs give different results

    torch._dynamo.reset()
    counters.clear()
    compiled = comfy_adapter.apply_compile(model, accel.compile.CompileConfig(torch_backend="eager"))
    cached = {mode: _step_cache(comfy_host, compiled, mode) for mode in ("forecast", "fixed")}
    events.subscribe(listen)
    try:
        graphs = None
        for (k, s, mode), ref in zip(runs, refs):
            out = dit_tiny.sample(_hotswap(comfy_host, cached[mode], names[k], s), fam, steps=STEPS, cfg=2.0)
            assert sorted(set(stats[-1]["cached_steps"])) == [1, 3], stats[-1]  # MiniMax H3 calls cond and uncond apart
            assert harness.rel_err(out, ref) < 1e-4, (k, s, mode)
            if graphs is None:
                graphs = int(counters["stats"]["unique_graphs"])
                assert graphs >= 1
            assert int(counters["stats"]["unique_graphs"]) == graphs, "a LoRA swap recompiled"
            assert not counters["recompiles"], dict(counters["recompiles"])
    finally:
        events.unsubscribe(listen)
    dit_tiny.sample(model, fam)  # another clone of the checkpoint samples: the hot-swapped LoRA comes out
    after = dit_tiny.weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
