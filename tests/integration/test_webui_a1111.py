"""SD Accel as an extension of a real stable-diffusion-webui (AUTOMATIC1111 1.10.1), booted in-process on the CPU.

Run with the webui venv (see docs/webui.md "Tests"):
    WEBUI_A1111_PATH=.hosts/webui-a1111-1.10.1 .hosts/venv-a1111/bin/python -m pytest -c tests/pytest.ini tests/integration/test_webui_a1111.py
The webui's UNet is its own ldm UNetModel (repositories/stable-diffusion-stability-ai), called
by its own k-diffusion samplers; see webui_harness.py for what is real and what stands in.
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

pytestmark = pytest.mark.skipif(harness.skip_reason("a1111") is not None, reason=str(harness.skip_reason("a1111")))

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
    base = tmp_path_factory.mktemp("a1111")
    w = harness.boot("a1111", harness.root("a1111"), base / "data", base / "standin")
    w.model = harness.a1111_model(w, harness.clip_dir(base / "clip"))
    from modules import shared

    w.lora_dir = Path(shared.cmd_opts.lora_dir)
    w.lora_dir.mkdir(parents=True, exist_ok=True)
    w.reference = w.txt2img(OFF)  # SD Accel present but off
    return w


@pytest.fixture(scope="module")
def adapter():
    """accel_core.hosts.webui as the extension loaded it (the package `sd_accel` from the extension folder)."""
    import importlib

    return importlib.import_module("sd_accel.accel_core.hosts.webui")


@pytest.fixture(autouse=True)
def _clean(adapter):
    yield
    adapter.finish_generation()


def unet_of(webui):
    return webui.model.model.diffusion_model


# --- loading and UI ------------------------------------------------------------------------------------

def test_extension_is_loaded_by_the_webui_loader(webui):
    from modules import extensions, script_callbacks, scripts, shared

    ours = [d for d in scripts.scripts_data if webui.is_ours(d.path)]
    assert [Path(d.path).name for d in ours] == ["sd_accel_script.py"]
    ext = next(e for e in extensions.extensions if e.name == "sd-accel")
    assert ext.metadata.canonical_name == "sd-accel"  # metadata.ini [Extension] Name
    registered = {k: [c.script for c in v if webui.is_ours(c.script)] for k, v in script_callbacks.callback_map.items()}
    assert any(s.endswith("sd_accel_tab.py") for s in registered["callbacks_ui_tabs"])
    for kind in ("callbacks_ui_settings", "callbacks_before_ui", "callbacks_model_loaded", "callbacks_script_unloaded"):
        assert any(s.endswith("sd_accel_script.py") for s in registered[kind]), kind
    for key in ("sd_accel_enabled", "sd_accel_backend", "sd_accel_deepcache_interval"):
        assert key in shared.opts.data_labels and shared.opts.data_labels[key].section[0] == "sd_accel"
    # The extension imports its folder as `sd_accel` (unique), not as a top-level `accel_core`.
    assert sys.modules["sd_accel"].__file__.startswith(str(webui.extension_dir))


def test_accordion_tab_and_paste_fields_are_built_with_real_gradio(webui, adapter):
    from modules import infotext_utils, scripts

    ours = webui.our_script
    assert ours.args_to - ours.args_from == len(adapter.UI_FIELDS)
    for tab in ("txt2img", "img2img"):
        fields = [key for _, key in infotext_utils.paste_fields[tab]["fields"] if callable(key)]
        assert [adapter.infotext_field(n) for n in adapter.UI_FIELDS] == [k for k in fields if k in ours.paste_field_names]
    img2img = next(s for s in scripts.scripts_img2img.alwayson_scripts if s.title() == "SD Accel")
    assert img2img.paste_field_names == ours.paste_field_names  # "Send to img2img" pairs the components
    depth = [b for b in webui.demo.blocks.values() if str(getattr(b, "elem_id", "")).endswith("sd_accel_deepcache_depth")]
    assert depth and all((b.minimum, b.maximum, b.step) == (0, 11, 1) for b in depth)  # txt2img and img2img
    tabs = [t for t in webui.demo.blocks.values() if getattr(t, "elem_id", None) == "sd_accel_bench_run"]
    assert tabs, "the SD Accel tab's Benchmark button is part of the UI"


def test_xyz_plot_has_sd_accel_axes(webui, adapter):
    from modules import scripts

    xyz = next(d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py")
    axes = {a.label: a for a in xyz.axis_options if a.label.startswith("[SD Accel]")}
    assert {"[SD Accel] Compile backend", "[SD Accel] Cache interval", "[SD Accel] LoRA hot-swap"} <= set(axes)
    # Each choice axis lists its own option's choices.
    for label, choices in (("Compile backend", adapter.BACKEND_CHOICES), ("Compile mode", adapter.MODES),
                           ("UNet dtype", adapter.DTYPE_CHOICES), ("Attention kernel", adapter.ATTENTION)):
        assert axes[f"[SD Accel] {label}"].choices() == list(choices), label
    p = type("P", (), {})()
    axes["[SD Accel] Cache interval"].apply(p, "3", None)
    axes["[SD Accel] Compile backend"].apply(p, "inductor", None)
    assert p.sd_accel_overrides == {"deepcache_interval": 3, "backend": "inductor"}


def test_settings_page_defaults_feed_the_accordion(webui):
    from modules import shared

    g = webui.script_globals()
    shared.opts.set("sd_accel_backend", "inductor")
    shared.opts.set("sd_accel_deepcache_interval", 3)
    try:
        d = g["_defaults"]()
        assert d.backend == "inductor" and d.deepcache_interval == 3 and not d.enabled
    finally:
        shared.opts.set("sd_accel_backend", "off")
        shared.opts.set("sd_accel_deepcache_interval", 1)


# --- generations ---------------------------------------------------------------------------------------

def test_off_leaves_the_webui_alone(webui):
    p, res = webui.txt2img(OFF)
    assert np.array_equal(image(res), image(webui.reference[1]))
    assert "SD Accel" not in res.infotexts[0]
    assert "forward" not in unet_of(webui).__dict__


def test_compile_matches_and_is_undone_after_the_generation(webui, adapter):
    from torch._dynamo.utils import counters

    counters.clear()
    p, res = webui.txt2img(accel(backend="inductor"))
    assert not counters["graph_break"], dict(counters["graph_break"])  # the whole UNet is one graph, not eager pieces
    assert np.abs(image(res) - image(webui.reference[1])).max() <= 1.0  # Dynamo (eager backend here) computes the same
    assert "SD Accel compile: inductor default" in res.infotexts[0]
    assert "SD Accel status" not in res.infotexts[0]
    assert "forward" not in unet_of(webui).__dict__  # postprocess took it off
    state = adapter.cache_state()
    assert any(c["status"] == "compiled" for e in state for c in e["compiled"])
    # A second generation reuses the compiled callable (no recompilation of the UNet).
    compiled = next(iter(compiled_of(unet_of(webui)).values()))
    p2, res2 = webui.txt2img(accel(backend="inductor"))
    assert next(iter(compiled_of(unet_of(webui)).values())) is compiled
    assert np.array_equal(image(res2), image(res))


def test_infotext_round_trips_through_the_webui_parser(webui, adapter):
    from modules import infotext_utils

    sent = accel(backend="inductor", dtype="bf16", channels_last=True, deepcache_interval=3, deepcache_depth=2, deepcache_start=0.1)
    p, res = webui.txt2img(sent)
    params = infotext_utils.parse_generation_parameters(res.infotexts[0])
    ours = webui.our_script
    pasted = [key(params) for comp, key in ours.infotext_fields]
    expected = adapter.options_from_args(sent)
    assert adapter.options_from_args(pasted) == expected
    assert params["SD Accel DeepCache"] == "interval=3 depth=2 start=0.1 end=1"


def test_cast_bf16_runs_a_copy_and_keeps_the_webui_weights(webui):
    unet = unet_of(webui)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    p, res = webui.txt2img(accel(dtype="bf16", channels_last=True))
    diff = np.abs(image(res) - image(webui.reference[1]))
    assert 0 < diff.mean() < 8.0  # bf16 arithmetic: close to the fp32 image, not identical
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in unet.state_dict().items())
    assert "SD Accel cast: bf16 channels_last attention=auto" in res.infotexts[0]


def test_deepcache_walk_is_the_ldm_forward(webui, adapter):
    unet = unet_of(webui)
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700, 700]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ref = type(unet).forward(unet, x, t, context=ctx)
        for depth in range(len(unet.input_blocks)):
            full, shallow = adapter.deepcache_paths(unet, depth, None)
            out, kept = full(x, t, context=ctx)
            assert torch.equal(out, ref)
            assert torch.allclose(shallow(kept, x, t, context=ctx), ref, atol=1e-5)  # same step: the cut is exact


def test_deepcache_generation_reuses_features_on_the_planned_steps(webui, adapter):
    from sd_accel.accel_core.deepcaching import DeepCacheConfig, full_steps

    p, res = webui.txt2img(accel(deepcache_interval=3, deepcache_depth=1), steps=9)
    runs = p.sd_accel_deepcache_runs
    assert len(runs) == 1
    total = runs[0]["steps"]
    planned = full_steps(total, DeepCacheConfig(cache_interval=3, cache_depth=1))
    assert runs[0]["hits"] == sum(not f for f in planned) > 0
    base_p, base = webui.txt2img(OFF, steps=9)
    diff = np.abs(image(res) - image(base))
    assert diff.max() > 0  # shallow steps really ran
    assert "SD Accel DeepCache: interval=3 depth=1" in res.infotexts[0]


def test_an_api_call_with_the_13_values_from_before_the_step_cache_runs_as_before(webui):
    webui.check_old_api_call(accel(deepcache_interval=3, deepcache_depth=1), "SD Accel DeepCache: interval=3 depth=1")


def test_lora_hot_swap_changes_the_image_and_restores_the_weights(webui, adapter):
    from safetensors.torch import save_file

    from testkit.loras import make_random_lora

    unet = unet_of(webui)
    save_file(make_random_lora(unet, fmt="kohya-ldm", seed=1, magnitude=2.0, with_text_encoder=False), str(webui.lora_dir / "rand_a.safetensors"))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    p, res = webui.txt2img(accel(loras="rand_a:1.0"))
    assert np.abs(image(res) - image(webui.reference[1])).max() > 0
    assert 'SD Accel LoRA: "rand_a:1"' in res.infotexts[0]  # the webui quotes values with a colon
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())  # bit-exact after the generation
    p2, res2 = webui.txt2img(OFF)
    assert np.array_equal(image(res2), image(webui.reference[1]))


def test_unknown_lora_is_reported_in_the_infotext(webui):
    p, res = webui.txt2img(accel(loras="does_not_exist:1"))
    assert "SD Accel status: \"error: SD Accel: LoRA 'does_not_exist' is not in the webui's LoRA folder" in res.infotexts[0]
    assert np.array_equal(image(res), image(webui.reference[1]))


def test_lcm_lora_switches_to_the_lcm_sampler(webui):
    from safetensors.torch import save_file

    from testkit.loras import make_random_lora

    save_file(make_random_lora(unet_of(webui), fmt="kohya-ldm", seed=2, with_text_encoder=False), str(webui.lora_dir / "lcm_rand.safetensors"))
    p, res = webui.txt2img(accel(lcm_lora="lcm_rand", lcm_strength=1.0))
    assert p.sampler_name == "LCM" and "Sampler: LCM" in res.infotexts[0]
    assert 'SD Accel LCM-LoRA: "lcm_rand:1"' in res.infotexts[0]


def test_another_extensions_forward_is_respected(webui):
    unet = unet_of(webui)
    calls = []

    def theirs(x, timesteps=None, context=None, **kw):  # what ControlNet does for a generation
        calls.append(1)
        return type(unet).forward(unet, x, timesteps, context, **kw)

    webui.before_run = [lambda p: setattr(unet, "forward", theirs)]
    try:
        p, res = webui.txt2img(accel(backend="inductor"))
    finally:
        webui.before_run = []
        del unet.__dict__["forward"]
    assert calls and "another extension replaced the UNet's forward" in res.infotexts[0]


def test_sd_unet_option_takes_precedence(webui, adapter):
    from modules import sd_unet

    class _Trt:
        option = type("O", (), {"label": "TRT engine"})()

    sd_unet.current_unet = _Trt()
    try:
        applied = adapter.A1111.apply(webui.model, adapter.WebuiOptions(enabled=True, backend="inductor"))
    finally:
        sd_unet.current_unet = None
    assert "SD Unet 'TRT engine' is active" in applied.status()
    assert "forward" not in unet_of(webui).__dict__


def test_checkpoint_change_drops_the_patch(webui, adapter):
    from modules import script_callbacks

    adapter.A1111.apply(webui.model, adapter.WebuiOptions(enabled=True, backend="inductor"))
    assert "forward" in unet_of(webui).__dict__
    script_callbacks.model_loaded_callback(webui.model)  # what the webui fires after loading a checkpoint
    assert "forward" not in unet_of(webui).__dict__


# --- the tab -------------------------------------------------------------------------------------------

def test_tab_benchmark_runs_the_sd_accel_bench(webui, tmp_path, monkeypatch):
    tab_globals = _tab_module_globals()
    monkeypatch.setattr(tab_globals["shared"], "data_path", str(tmp_path), raising=False)
    outs = list(tab_globals["run_benchmark"](tab_globals["SOURCES"][1], "cpu", 2, "eager"))
    log, table, png, json_path = outs[-1]
    print(log)
    assert table and table[0][0].startswith("eager") and Path(json_path).is_file()
    assert any("measured:" in o[0] for o in outs[:-1])  # progress lines arrived before the result


def _tab_module_globals() -> dict:
    from modules import script_callbacks

    cb = next(c for c in script_callbacks.callback_map["callbacks_ui_tabs"] if c.script.endswith("sd_accel_tab.py"))
    return cb.callback.__globals__


def test_tab_status_and_clear(webui):
    g = _tab_module_globals()
    webui.txt2img(accel(backend="inductor"))
    assert "A1111: compile: inductor default" in g["status_text"]()
    assert "compiled" in g["cache_text"]()
    msg, cache = g["clear_cache"]()
    assert "Cleared" in msg and cache == "Nothing compiled or cast yet."


# --- install.py under the webui ----------------------------------------------------------------------

def test_install_py_under_the_webui_launcher(webui):
    """What launch_utils.run_extension_installer does: the webui's Python, PYTHONPATH = webui root."""
    import os

    env = dict(os.environ, PYTHONPATH=str(webui.path))
    out = subprocess.run([sys.executable, str(harness.REPO / "install.py")], cwd=str(webui.path), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "SD Accel install: stable-fast:" in out.stdout and "SD Accel install: onediff:" in out.stdout
    assert "Installing" not in out.stdout  # everything required is there: nothing was pip-installed
