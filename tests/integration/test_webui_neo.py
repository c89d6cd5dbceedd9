"""SD Accel as an extension of a real Forge Neo, booted in-process on the CPU.

Run with the Neo venv (Python 3.13; see docs/webui.md "Tests"):
    WEBUI_NEO_PATH=.hosts/webui-neo .hosts/venv-neo/bin/python -m pytest -c tests/pytest.ini tests/integration/test_webui_neo.py
The model is Neo's own SD1.5 engine (backend/diffusion_engine/sd15.py: UnetPatcher over KModel
over IntegratedUNet2DConditionModel) around tiny components; sampling runs through Neo's
processing, its k-diffusion samplers and backend/sampling/sampling_function.py. Neo's built-in
"Torch Compile Integrated" script (extensions-builtin/sd_forge_compile) is loaded as in Neo.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import webui_harness as harness  # noqa: E402

pytestmark = pytest.mark.skipif(harness.skip_reason("neo") is not None, reason=str(harness.skip_reason("neo")))

OFF = [False, "off", "default", "off", False, "auto", 1, 0, 0.0, 1.0, "None", 1.0, "", "forecast", 1, 0, 0.1]  # the declared webui defaults, in UI_FIELDS order
NEO_COMPILE = "TorchCompileForForge"  # the class of Neo's compile script (its title is translated in some copies)


def accel(**kw) -> list:
    """Accordion values (UI_FIELDS order), enabled, with `kw` set."""
    from sd_accel.accel_core.hosts import webui as w

    values = dict(zip(w.UI_FIELDS, OFF))
    values.update(enabled=True, **kw)
    return [values[n] for n in w.UI_FIELDS]


def compiled_of(unet) -> dict:
    import importlib

    return importlib.import_module("sd_accel.accel_core.registry").compiled_of(unet)


def image(res) -> np.ndarray:
    return np.asarray(res.images[0]).astype(np.float64)


def lora_file(unet, path: Path, seed: int):
    from safetensors.torch import save_file

    from testkit.loras import make_random_lora

    save_file(make_random_lora(unet, fmt="kohya-ldm", seed=seed, magnitude=2.0, with_text_encoder=False), str(path))


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    base = tmp_path_factory.mktemp("neo")
    extra = base / "more_loras"  # a second LoRA folder, as Neo's --lora-dirs (a list) adds
    extra.mkdir()
    # --use-pytorch-cross-attention: the attention Neo picks on NVIDIA GPUs. Its CPU default,
    # attention_basic, calls platform.mac_ver() on every call, which Dynamo cannot trace: the UNet
    # would run eager under any compile, and the compile test below would prove nothing.
    argv = ["--lora-dirs", str(extra), "--use-pytorch-cross-attention"]
    w = harness.boot("neo", harness.root("neo"), base / "data", base / "standin", extra_argv=argv)
    w.model = harness.forge_model(w)
    from modules import shared

    w.lora_dir, w.extra_lora_dir = Path(shared.cmd_opts.lora_dir), extra
    w.lora_dir.mkdir(parents=True, exist_ok=True)
    w.reference = w.txt2img(OFF)
    return w


@pytest.fixture(scope="module")
def adapter(webui):
    """accel_core.hosts.webui as the extension loaded it (the package `sd_accel` from the extension folder; Neo's venv has no other)."""
    import importlib

    return importlib.import_module("sd_accel.accel_core.hosts.webui")


@pytest.fixture(autouse=True)
def _clean(adapter):
    yield
    adapter.finish_generation()


def unet_of(webui):
    return webui.model.forge_objects_after_applying_lora.unet.model.diffusion_model


def adapter_forge():
    import importlib

    return importlib.import_module("sd_accel.accel_core.hosts.webui.forge_wrapper")


def kmodel_of(webui):
    return webui.model.forge_objects_after_applying_lora.unet.model


@pytest.fixture
def eager_neo_compile(monkeypatch):
    """Neo's compile script as it is, with Dynamo's eager backend in place of inductor (the same wrapping, seconds not minutes on a CPU)."""
    orig = torch.compile

    def compile_eager(model=None, **kw):
        return orig(model, backend="eager", dynamic=kw.get("dynamic"), fullgraph=False)

    monkeypatch.setattr(torch, "compile", compile_eager)
    yield


# --- loading and UI ------------------------------------------------------------------------------------

def test_extension_is_loaded_by_neos_loader(webui, adapter):
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
    assert sys.modules["sd_accel"].__file__.startswith(str(webui.extension_dir))
    assert webui.script(NEO_COMPILE) is not None  # Neo's own compile script is there too (triton is installed)


def test_off_leaves_neo_alone(webui):
    p, res = webui.txt2img(OFF)
    assert np.array_equal(image(res), image(webui.reference[1]))
    assert "SD Accel" not in res.infotexts[0]


def test_compile_on_a_clone_of_neos_unet_patcher(webui):
    base = webui.model.forge_objects_after_applying_lora.unet
    before = dict(base.model_options)
    from torch._dynamo.utils import counters

    counters.clear()
    p, res = webui.txt2img(accel(backend="inductor"))
    assert not counters["graph_break"], dict(counters["graph_break"])  # the whole UNet is one graph, not eager pieces
    assert np.abs(image(res) - image(webui.reference[1])).max() <= 1.0
    assert "SD Accel compile: inductor default" in res.infotexts[0]
    assert base.model_options == before
    assert "forward" not in unet_of(webui).__dict__
    assert any(cu.report.status == "compiled" for cu in compiled_of(unet_of(webui)).values())


def test_infotext_round_trips_through_neos_parser(webui, adapter):
    from modules import infotext_utils

    sent = accel(backend="inductor", deepcache_interval=2, deepcache_depth=1, loras="", attention="math")
    p, res = webui.txt2img(sent)
    params = infotext_utils.parse_generation_parameters(res.infotexts[0])
    pasted = [key(params) for comp, key in webui.our_script.infotext_fields]
    assert adapter.options_from_args(pasted) == adapter.options_from_args(sent)


# --- DeepCache ----------------------------------------------------------------------------------------

def test_deepcache_walk_is_neos_unet_forward(webui, adapter):
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


def test_deepcache_generation_follows_neos_denoiser(webui):
    from sd_accel.accel_core.deepcaching import DeepCacheConfig, full_steps

    p, res = webui.txt2img(accel(deepcache_interval=3, deepcache_depth=1), steps=9)
    runs = p.sd_accel_deepcache_runs
    assert len(runs) == 1
    planned = full_steps(runs[0]["steps"], DeepCacheConfig(cache_interval=3, cache_depth=1))
    assert runs[0]["hits"] == sum(not f for f in planned) > 0
    base_p, base = webui.txt2img(OFF, steps=9)
    assert np.abs(image(res) - image(base)).max() > 0


def test_an_api_call_with_the_13_values_from_before_the_step_cache_runs_as_before(webui):
    webui.check_old_api_call(accel(deepcache_interval=3, deepcache_depth=1), "SD Accel DeepCache: interval=3 depth=1")


# --- LoRAs: Neo's folders, hot-swap, LCM ---------------------------------------------------------------

def test_lora_under_lora_dirs_is_found_and_restored(webui):
    # The LoRA lives in the folder --lora-dirs adds, not in --lora-dir.
    unet = unet_of(webui)
    lora_file(unet, webui.extra_lora_dir / "in_extra_dir.safetensors", seed=1)
    names = webui.script_globals()["_lora_names"]()
    assert "in_extra_dir" in names
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    p, res = webui.txt2img(accel(loras="in_extra_dir:1.0"))
    assert "error" not in res.infotexts[0]
    assert np.abs(image(res) - image(webui.reference[1])).max() > 0
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    p2, res2 = webui.txt2img(OFF)
    assert np.array_equal(image(res2), image(webui.reference[1]))


def test_unknown_lora_names_every_folder(webui):
    p, res = webui.txt2img(accel(loras="no_such_lora:1.0"))
    text = res.infotexts[0]
    assert "SD Accel status: \"error: SD Accel" in text and str(webui.lora_dir) in text and str(webui.extra_lora_dir) in text
    assert np.array_equal(image(res), image(webui.reference[1]))  # nothing applied


def test_lcm_lora_switches_to_neos_lcm_sampler(webui):
    unet = unet_of(webui)
    lora_file(unet, webui.lora_dir / "lcm_rand.safetensors", seed=2)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    p, res = webui.txt2img(accel(lcm_lora="lcm_rand", lcm_strength=1.0), steps=4, cfg_scale=1.5)
    assert p.sampler_name == "LCM" and "Sampler: LCM" in res.infotexts[0]
    assert "SD Accel LCM" in res.infotexts[0] and "error" not in res.infotexts[0]
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


# --- living with Neo's Torch Compile Integrated ---------------------------------------------------------

def test_neos_compile_on_sd_accel_steps_aside_and_never_crashes(webui, eager_neo_compile):
    neo_on, neo_off = {NEO_COMPILE: ["dynamic"]}, {NEO_COMPILE: [_disable_choice()]}
    try:
        _, neo_only = webui.txt2img(OFF, scripts_args=neo_on)
        assert "apply_model" in vars(kmodel_of(webui))  # Neo's compile wraps the model's apply_model
        compiled_before = set(compiled_of(unet_of(webui)))
        p, res = webui.txt2img(accel(backend="inductor", deepcache_interval=3, deepcache_depth=1), steps=6, scripts_args=neo_on)
        text = res.infotexts[0]
        assert "Torch Compile Integrated" in text and "steps aside" in text and "compile and DeepCache not applied" in text
        assert "error" not in text
        assert set(compiled_of(unet_of(webui))) == compiled_before  # SD Accel compiled nothing
        _, ref6 = webui.txt2img(OFF, steps=6, scripts_args=neo_on)
        assert np.array_equal(image(res), image(ref6))  # Neo's compile alone ran
        # LoRAs are fused in the weights outside Neo's compiled region: they still apply, and come out again.
        unet = unet_of(webui)
        lora_file(unet, webui.lora_dir / "with_neo.safetensors", seed=3)
        before = {k: v.clone() for k, v in unet.state_dict().items()}
        p, res = webui.txt2img(accel(loras="with_neo:1.0"), scripts_args=neo_on)
        assert "error" not in res.infotexts[0] and 'SD Accel LoRA: "with_neo:1"' in res.infotexts[0]
        assert np.abs(image(res) - image(neo_only)).max() > 0
        assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    finally:
        webui.txt2img(OFF, scripts_args=neo_off)
    # Disable puts the model's own bound method back as an instance attribute: that is not a wrapper.
    assert adapter_forge().host_compile(kmodel_of(webui)) is None
    p, res = webui.txt2img(accel(backend="inductor"))  # Neo's compile off again: SD Accel's compile applies
    assert "Torch Compile Integrated" not in res.infotexts[0]
    assert any(cu.report.status == "compiled" for cu in compiled_of(unet_of(webui)).values())


def _disable_choice() -> str:
    """The 'Disable' preset of Neo's compile script, in the language this copy shows."""
    from modules import scripts

    path = next(d.path for d in scripts.scripts_data if d.script_class.__name__ == NEO_COMPILE)
    return "禁用" if "禁用" in Path(path).read_text(encoding="utf-8") else "Disable"


# --- quantized UNets (Neo's 'Diffusion in Low Bits', GGUF) ----------------------------------------------

def test_fp8_unet_refuses_compile_and_loras_and_runs_deepcache(webui):
    fp8 = harness.forge_engine(webui, unet_dtype=torch.float8_e4m3fn)
    try:
        harness.use_engine(webui, fp8)
        unet = fp8.forge_objects_after_applying_lora.unet.model.diffusion_model
        assert unet.input_blocks[1][0].in_layers[2].weight.dtype == torch.float8_e4m3fn
        bits = {k: v.view(torch.uint8).clone() if v.dtype == torch.float8_e4m3fn else v.clone() for k, v in unet.state_dict().items()}
        _, plain = webui.txt2img(OFF)
        lora_file(unet, webui.lora_dir / "for_fp8.safetensors", seed=4)
        for asked in (accel(backend="inductor"), accel(loras="for_fp8:1.0")):
            p, res = webui.txt2img(asked)
            text = res.infotexts[0]
            assert "SD Accel status: \"error: SD Accel" in text and "float8_e4m3fn" in text and "fp16, bf16 or fp32" in text and "not changed" in text
            assert np.array_equal(image(res), image(plain))
        assert compiled_of(unet) == {}
        assert all(torch.equal(v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v, bits[k]) for k, v in unet.state_dict().items())
        p, res = webui.txt2img(accel(deepcache_interval=3, deepcache_depth=1), steps=9)
        assert "error" not in res.infotexts[0] and p.sd_accel_deepcache_runs[0]["hits"] > 0
    finally:
        harness.use_engine(webui, webui.model)


def test_gguf_unet_is_refused_with_what_to_do(webui, adapter):
    # A UNet holding Neo's own GGUF parameters (backend/operations_gguf.py ParameterGGUF, Q8_0 data from its gguf package).
    import copy

    from backend.operations_gguf import ParameterGGUF
    from gguf import GGMLQuantizationType, quants

    patcher = webui.model.forge_objects_after_applying_lora.unet.clone()
    patcher.model = copy.deepcopy(patcher.model)
    lin = patcher.model.diffusion_model.input_blocks[1][1].proj_in
    w = lin.weight.detach()
    lin.weight = ParameterGGUF(torch.from_numpy(quants.quantize(w.reshape(w.shape[0], -1).numpy(), GGMLQuantizationType.Q8_0)),
                               tensor_type=GGMLQuantizationType.Q8_0, tensor_shape=w.shape)
    options = dict(patcher.model_options)
    with pytest.raises(adapter.SDAccelError) as e:
        adapter.apply_forge(patcher, adapter.WebuiOptions(enabled=True, backend="inductor"))
    assert "GGUF Q8_0" in str(e.value) and "Diffusion in Low Bits" in str(e.value) and "DeepCache works" in str(e.value)
    assert patcher.model_options == options and compiled_of(patcher.model.diffusion_model) == {}
