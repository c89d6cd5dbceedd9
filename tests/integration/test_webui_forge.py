"""SD Accel as an extension of a real Forge (lllyasviel/stable-diffusion-webui-forge, June 2025), booted in-process on the CPU.

Run with the Forge venv (see docs/webui.md "Tests"):
    WEBUI_FORGE_PATH=.hosts/webui-forge .hosts/venv-forge/bin/python -m pytest -c tests/pytest.ini tests/integration/test_webui_forge.py
The model is Forge's own SD1.5 engine (backend/diffusion_engine/sd15.py: UnetPatcher over KModel
over IntegratedUNet2DConditionModel) around tiny components; sampling runs through Forge's
processing, k-diffusion samplers and backend/sampling/sampling_function.py. See webui_harness.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import webui_harness as harness  # noqa: E402

pytestmark = pytest.mark.skipif(harness.skip_reason("forge") is not None, reason=str(harness.skip_reason("forge")))

OFF = [False, "off", "default", "off", False, "auto", 1, 0, 0.0, 1.0, "None", 1.0, "", "forecast", 1, 0, 0.1]  # the declared webui defaults, in UI_FIELDS order


def accel(**kw) -> list:
    """Accordion values (UI_FIELDS order), enabled, with `kw` set."""
    from sd_accel.accel_core.hosts import webui as w

    values = dict(zip(w.UI_FIELDS, OFF))
    values.update(enabled=True, **kw)
    return [values[n] for n in w.UI_FIELDS]


def compiled_of(unet) -> dict:
    """The UNet's compiled callables in the core registry (of the `sd_accel` the extension loaded)."""
    import importlib

    return importlib.import_module("sd_accel.accel_core.registry").compiled_of(unet)


def image(res) -> np.ndarray:
    return np.asarray(res.images[0]).astype(np.float64)


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    base = tmp_path_factory.mktemp("forge")
    # --attention-pytorch: the attention Forge picks on NVIDIA GPUs. Its CPU default, sub-quadratic
    # attention, reads free memory (psutil) on every call, which Dynamo cannot trace: the UNet would
    # run as eager pieces under any compile, and the compile test would prove nothing.
    w = harness.boot("forge", harness.root("forge"), base / "data", base / "standin", extra_argv=["--attention-pytorch"])
    w.model = harness.forge_model(w)
    from modules import shared

    w.lora_dir = Path(shared.cmd_opts.lora_dir)
    w.lora_dir.mkdir(parents=True, exist_ok=True)
    w.reference = w.txt2img(OFF)
    return w


@pytest.fixture(scope="module")
def adapter():
    import importlib

    return importlib.import_module("sd_accel.accel_core.hosts.webui")


@pytest.fixture(autouse=True)
def _clean(adapter):
    yield
    adapter.finish_generation()


def unet_of(webui):
    return webui.model.forge_objects_after_applying_lora.unet.model.diffusion_model


def base_patcher(webui):
    return webui.model.forge_objects_after_applying_lora.unet


# --- loading and UI ------------------------------------------------------------------------------------

def test_extension_is_loaded_by_forges_loader(webui, adapter):
    from modules import infotext_utils, script_callbacks, scripts, shared

    ours = [d for d in scripts.scripts_data if webui.is_ours(d.path)]
    assert [Path(d.path).name for d in ours] == ["sd_accel_script.py"]
    registered = {k: [c.script for c in v if webui.is_ours(c.script)] for k, v in script_callbacks.callback_map.items()}
    assert any(s.endswith("sd_accel_tab.py") for s in registered["callbacks_ui_tabs"])
    assert "sd_accel_backend" in shared.opts.data_labels
    script = webui.our_script
    assert script.args_to - script.args_from == len(adapter.UI_FIELDS)
    fields = [key for _, key in infotext_utils.paste_fields["txt2img"]["fields"] if callable(key)]
    assert [adapter.infotext_field(n) for n in adapter.UI_FIELDS] == [k for k in fields if k in script.paste_field_names]
    xyz = next(d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py")
    assert "[SD Accel] Cache interval" in {a.label for a in xyz.axis_options}
    # Forge keeps extension roots on sys.path; SD Accel still imports itself under its unique name.
    assert sys.modules["sd_accel"].__file__.startswith(str(webui.extension_dir))


def test_off_leaves_forge_alone(webui):
    p, res = webui.txt2img(OFF)
    assert np.array_equal(image(res), image(webui.reference[1]))
    assert "SD Accel" not in res.infotexts[0]


def test_compile_on_a_clone_of_forges_unet_patcher(webui, adapter):
    before = dict(base_patcher(webui).model_options)
    from torch._dynamo.utils import counters

    counters.clear()
    p, res = webui.txt2img(accel(backend="inductor"))
    assert not counters["graph_break"], dict(counters["graph_break"])  # the whole UNet is one graph, not eager pieces
    assert np.abs(image(res) - image(webui.reference[1])).max() <= 1.0
    assert "SD Accel compile: inductor default" in res.infotexts[0]
    assert base_patcher(webui).model_options == before  # the clone got the wrapper, not Forge's own patcher
    assert "forward" not in unet_of(webui).__dict__
    compiled = compiled_of(unet_of(webui))
    assert any(cu.report.status == "compiled" for cu in compiled.values())


def test_infotext_round_trips_through_forges_parser(webui, adapter):
    from modules import infotext_utils

    sent = accel(backend="inductor", deepcache_interval=2, deepcache_depth=1, loras="", attention="math")
    p, res = webui.txt2img(sent)
    params = infotext_utils.parse_generation_parameters(res.infotexts[0])
    pasted = [key(params) for comp, key in webui.our_script.infotext_fields]
    assert adapter.options_from_args(pasted) == adapter.options_from_args(sent)


def test_deepcache_walk_is_forges_unet_forward(webui, adapter):
    unet = unet_of(webui)
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700.0, 700.0]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ref = type(unet).forward(unet, x, t, context=ctx, transformer_options={})
        for depth in range(len(unet.input_blocks)):
            full, shallow = adapter.deepcache_paths(unet, depth, None)
            out, kept = full(x, t, context=ctx, transformer_options={})
            assert torch.equal(out, ref)
            assert torch.allclose(shallow(kept, x, t, context=ctx, transformer_options={}), ref, atol=1e-5)


def test_deepcache_generation_follows_forges_denoiser(webui, adapter):
    from sd_accel.accel_core.deepcaching import DeepCacheConfig, full_steps

    p, res = webui.txt2img(accel(deepcache_interval=3, deepcache_depth=1), steps=9)
    stats = adapter.last_applied()
    runs = p.sd_accel_deepcache_runs
    assert len(runs) == 1
    planned = full_steps(runs[0]["steps"], DeepCacheConfig(cache_interval=3, cache_depth=1))
    assert runs[0]["hits"] == sum(not f for f in planned) > 0
    base_p, base = webui.txt2img(OFF, steps=9)
    assert np.abs(image(res) - image(base)).max() > 0
    assert stats is not None


def test_an_api_call_with_the_13_values_from_before_the_step_cache_runs_as_before(webui):
    webui.check_old_api_call(accel(deepcache_interval=3, deepcache_depth=1), "SD Accel DeepCache: interval=3 depth=1")


def test_cast_is_left_to_forge(webui):
    p, res = webui.txt2img(accel(dtype="fp16"))
    assert "Diffusion in Low Bits" in res.infotexts[0]
    assert np.array_equal(image(res), image(webui.reference[1]))


def test_lora_hot_swap_on_forge_restores_the_weights(webui):
    from safetensors.torch import save_file

    from testkit.loras import make_random_lora

    unet = unet_of(webui)
    save_file(make_random_lora(unet, fmt="kohya-ldm", seed=1, magnitude=2.0, with_text_encoder=False), str(webui.lora_dir / "rand_f.safetensors"))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    p, res = webui.txt2img(accel(loras="rand_f:1.0"))
    assert np.abs(image(res) - image(webui.reference[1])).max() > 0
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    p2, res2 = webui.txt2img(OFF)
    assert np.array_equal(image(res2), image(webui.reference[1]))


def test_install_py_under_forges_launcher(webui):
    import os

    env = dict(os.environ, PYTHONPATH=str(webui.path))
    out = subprocess.run([sys.executable, str(harness.REPO / "install.py")], cwd=str(webui.path), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "SD Accel install: stable-fast:" in out.stdout
