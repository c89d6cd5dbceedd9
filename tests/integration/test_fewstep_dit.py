"""The LCM-LoRA Sampler node with the DiT families' few-step LoRAs in a real ComfyUI: it recognises
Qwen-Image-Lightning, Wan lightx2v, Hyper-FLUX and FLUX Turbo and samples with each one's settings,
equal to doing it by hand (LoraLoaderModelOnly + ModelSamplingSD3/AuraFlow shift + KSampler with
the published steps, CFG, sampler, scheduler); anything else is refused with the model untouched."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import save_file

import comfy_harness as harness
import dit_models
import dit_tiny

# (family, file name, LoRA format, expected: steps, cfg, sampler, scheduler, shift, strength)
CASES = [
    ("qwen_image", "Qwen-Image-Lightning-8steps-V1.0.safetensors", "diffusers", (8, 1.0, "euler", "simple", 3.0, 1.0)),
    ("qwen_image", "Qwen-Image-Lightning-4steps-V1.0.safetensors", "kohya", (4, 1.0, "euler", "simple", 3.0, 1.0)),
    ("wan", "lightx2v_T2V_14B_cfg_step_distill_v2_lora_rank64_bf16.safetensors", "lightx2v", (4, 1.0, "lcm", "simple", 5.0, 1.0)),
    ("flux", "Hyper-FLUX.1-dev-8steps-lora.safetensors", "diffusers", (8, 1.0, "euler", "simple", None, 0.125)),
    ("flux", "FLUX.1-Turbo-Alpha.safetensors", "diffusers", (8, 1.0, "euler", "simple", None, 1.0)),
]


@pytest.fixture(scope="module")
def folder(comfy_host, tmp_path_factory):
    import folder_paths

    f = tmp_path_factory.mktemp("fewstep_loras")
    folder_paths.add_model_folder_path("loras", str(f))
    return f


_models = {}


def _model(fam):
    reason = dit_models.available(fam)
    if reason:
        pytest.skip(reason)
    if fam not in _models:
        _models[fam] = dit_tiny.tiny_model(fam)
    return _models[fam]


def _lora(folder, model, fam, name, fmt, seed=7):
    path = folder / name
    if not path.exists():
        save_file(dit_tiny.make_lora(model, fam, fmt, seed=seed, rank=4), str(path))
    return str(path)


def _node(comfy_host, model, fam, name, steps=4, cfg=1.5, strength=1.0, settings=True):
    pos, neg = dit_tiny.conditioning(fam)
    with torch.inference_mode():
        out = comfy_host.node("SDAccelLCMLoRASampler").sample(model, pos, neg, dit_models.latent(fam), name, strength, 42, steps, cfg, 1.0,
                                                              lora_settings=settings)
    return out[0]["samples"].clone()


def _by_hand(model, fam, path, steps, cfg, sampler, scheduler, shift, strength):
    import comfy.sd
    import comfy.utils
    import nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux, ModelSamplingSD3

    m = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(path, safe_load=True), strength, 0)[0]
    if shift is not None:  # the node a user would put in: Flux-style sampling takes mu = ln(shift)
        ms = m.get_model_object("model_sampling")
        if hasattr(ms, "multiplier"):
            out = ModelSamplingSD3().patch(m, shift, multiplier=ms.multiplier)
        else:
            out = ModelSamplingFlux().patch(m, math.log(shift), math.log(shift), 1024, 1024)
        m = out[0] if isinstance(out, tuple) else out.result[0]
        mult = getattr(m.get_model_object("model_sampling"), "multiplier", 1.0)
        sigma = float(m.get_model_object("model_sampling").sigma(torch.tensor(0.5 * mult)))
        assert abs(sigma - shift * 0.5 / (1 + (shift - 1) * 0.5)) < 1e-4  # the published shift curve
    pos, neg = dit_tiny.conditioning(fam)
    with torch.inference_mode():
        return nodes.common_ksampler(m, 42, steps, cfg, sampler, scheduler, pos, neg, dit_models.latent(fam))[0]["samples"].clone()


@pytest.mark.parametrize("fam,name,fmt,expect", CASES, ids=[c[1].split(".safetensors")[0] for c in CASES])
def test_few_step_lora_samples_with_its_own_settings(comfy_host, folder, fam, name, fmt, expect, caplog):
    model = _model(fam)
    path = _lora(folder, model, fam, name, fmt)
    before = dit_tiny.weights(model)
    with caplog.at_level(logging.INFO):
        out = _node(comfy_host, model, fam, name)
    steps, cfg, sampler, scheduler, shift, strength = expect
    line = next(r.getMessage() for r in caplog.records if "LCM-LoRA Sampler:" in r.getMessage())
    assert f"{steps} steps, CFG {cfg:g}, {sampler} / {scheduler}" in line, line
    ref = _by_hand(model, fam, path, steps, cfg, sampler, scheduler, shift, strength)
    assert harness.rel_err(out, ref) < 1e-4
    plain = _by_hand(model, fam, path, steps, cfg, sampler, scheduler, shift, 0.0)
    assert harness.rel_err(out, plain) > 1e-3  # the LoRA was in
    _by_hand(model, fam, path, 1, 1.0, "euler", "simple", None, 0.0)  # another clone samples: hot-swap releases
    after = dit_tiny.weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_settings_off_uses_the_nodes_steps_and_cfg(comfy_host, folder, caplog):
    model = _model("qwen_image")
    fam, name, fmt, (_, _, sampler, scheduler, shift, strength) = CASES[0][0], CASES[0][1], CASES[0][2], CASES[0][3]
    path = _lora(folder, model, fam, name, fmt)
    with caplog.at_level(logging.INFO):
        out = _node(comfy_host, model, fam, name, steps=3, cfg=2.0, settings=False)
    assert "3 steps, CFG 2" in caplog.text
    assert harness.rel_err(out, _by_hand(model, fam, path, 3, 2.0, sampler, scheduler, shift, strength)) < 1e-4


@pytest.mark.parametrize("fam,name,fmt,expect", [
    ("qwen_image", "my_style.safetensors", "comfy", "is not a few-step LoRA SD Accel knows"),
    ("zimage", "zimage_style.safetensors", "kohya", "Z-Image-Turbo is a distilled checkpoint"),
    ("wan", "Qwen-Image-Lightning-8steps-V1.0.safetensors", None, "does not fit this model"),
    ("ltx", "ltxv_style.safetensors", "comfy", "no few-step LoRA is known for LTX-Video"),
    ("minimax", "minimax_h3_style.safetensors", "kohya", "no few-step LoRA is known for MiniMax H3"),
])
def test_other_loras_are_refused_with_the_model_untouched(comfy_host, folder, fam, name, fmt, expect):
    model = _model(fam)
    if fmt is not None:
        _lora(folder, model, fam, name, fmt)
    else:
        _lora(folder, _model("qwen_image"), "qwen_image", name, "diffusers")
    before = dit_tiny.weights(model)
    with pytest.raises(Exception) as e:
        _node(comfy_host, model, fam, name)
    assert type(e.value).__name__ == "SDAccelError"
    assert expect in str(e.value), str(e.value)
    after = dit_tiny.weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
