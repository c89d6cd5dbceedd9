"""Status events from a real ComfyUI sampling run carry the ids of the SD Accel nodes that built the model.

Needs COMFYUI_PATH (a ComfyUI checkout with its requirements installed); skipped without it.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFY or not Path(COMFY, "comfy").is_dir(),
                                reason="COMFYUI_PATH is not set to a ComfyUI checkout (see docs/testing.md)")

TINY_SD15 = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1], channel_mult=[1, 2],
    transformer_depth=[1, 0], transformer_depth_output=[1, 1, 0, 0], transformer_depth_middle=0,
    context_dim=768, use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
)


@pytest.fixture(scope="module")
def comfy():
    sys.path.insert(0, COMFY)
    if Path(COMFY, "_cpu_stubs").is_dir():  # CPU-only machines: ComfyUI imports torchvision at module level
        sys.path.append(str(Path(COMFY, "_cpu_stubs")))
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu at import)
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models

    return comfy


@pytest.fixture
def model(comfy):
    mc = comfy.supported_models.SD15(dict(TINY_SD15))
    mc.set_inference_dtype(torch.float32, None)
    bm = mc.get_model({}, "", device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    mm = comfy.model_management
    return comfy.model_patcher.ModelPatcher(bm, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def _sample(comfy, model, steps=2):
    cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, 1.0, "euler", "normal", cond, cond, latent, seed=0)


def test_run_events_name_the_nodes_that_built_the_model(comfy, model):
    from sd_accel.accel_core import events
    from sd_accel.accel_core.compiling import CompileConfig
    from sd_accel.accel_core.hosts import comfy as host
    from sd_accel.accel_core.hosts.comfy import events as comfy_events

    seen = []
    listener = lambda ev, data: seen.append((ev, dict(data), comfy_events.payload(ev, data)))  # noqa: E731
    events.subscribe(listener)
    try:
        m = comfy_events.track(host.apply_compile(model, CompileConfig(torch_backend="eager")), "compile", "12", source=model)
        assert comfy_events.tracked_nodes(m) == {"compile": "12"} and comfy_events.tracked_nodes(model) == {}
        # Like the LoRA swap: emitted at pre-run, before the sampling loop starts.
        import comfy.patcher_extension as pe

        m.add_callback_with_key(pe.CallbacksMP.ON_PRE_RUN, "test", lambda patcher: events.emit("pre_run_probe"))
        _sample(comfy, m, steps=3)
    finally:
        events.unsubscribe(listener)

    names = [ev for ev, _, _ in seen]
    assert names[0] == "node_applied" and "compile_start" in names and names[-1] == "run_stats", names
    assert next(p for ev, _, p in seen if ev == "pre_run_probe")["nodes"] == {"compile": "12"}
    assert "compile_end" in names or "fallback" in names
    start = next(p for ev, _, p in seen if ev == "compile_start")
    assert start["nodes"] == {"compile": "12"}  # emitted deep inside sampling, still attributed to node 12
    stats = seen[-1][1]
    assert stats["steps"] == 3 and stats["its"] > 0
    assert stats["report"]["status"] in ("compiled", "partial", "eager")
    assert stats["compile_seconds_in_run"] > 0

    # A second run: no new compile, the same node mapping, the report still attached.
    seen.clear()
    events.subscribe(listener)
    try:
        _sample(comfy, m, steps=2)
    finally:
        events.unsubscribe(listener)
    assert [ev for ev, _, _ in seen] == ["pre_run_probe", "run_stats"]
    assert seen[-1][2]["nodes"] == {"compile": "12"} and seen[-1][1]["compile_seconds_in_run"] == 0


def test_chained_nodes_accumulate_and_input_stays_clean(comfy, model):
    from sd_accel.accel_core.casting import CastConfig
    from sd_accel.accel_core.compiling import CompileConfig
    from sd_accel.accel_core.hosts import comfy as host
    from sd_accel.accel_core.hosts.comfy import cast as comfy_cast, events as comfy_events

    cast = comfy_events.track(comfy_cast.apply_cast(model, CastConfig(dtype="fp32", channels_last=False)), "cast", "4", source=model)
    comp = comfy_events.track(host.apply_compile(cast, CompileConfig(torch_backend="eager")), "compile", "5", source=cast)
    assert comfy_events.tracked_nodes(comp) == {"cast": "4", "compile": "5"}
    assert comfy_events.tracked_nodes(cast) == {"cast": "4"}
    assert comfy_events.tracked_nodes(model) == {}
