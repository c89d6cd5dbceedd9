"""LoRA Hot-Swap on ComfyUI's DiT families (Flux, Qwen-Image, Z-Image, Wan, LTX-Video, LTX-2, MiniMax H3), tiny real classes:
every name ComfyUI's loader maps resolves to the same weight (and slice), the fused weights equal
what ComfyUI's LoraLoader patches for each file format, removal restores the exact bits, swaps
on a compiled model never recompile, and a LoRA for another family is refused with the model
untouched."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import dit_tiny

STRENGTH = 0.8


@pytest.fixture(scope="module")
def lora(comfy_host):
    return comfy_host.pack_module("accel_core.lora")


@pytest.fixture(scope="module")
def names(comfy_host):
    return comfy_host.pack_module("accel_core.lora_names")


_models = {}


def _model(family):
    reason = dit_tiny.skip_reason(family)
    if reason:
        pytest.skip(reason)
    if family not in _models:
        _models[family] = dit_tiny.tiny_model(family)
    return _models[family]


def _save(tmp_path, sd, name):
    p = tmp_path / f"{name}.safetensors"
    save_file(sd, str(p))
    return str(p)


@pytest.mark.parametrize("family", dit_tiny.FAMILIES)
def test_every_name_comfyui_maps_resolves_to_the_same_weight(comfy_host, names, family):
    import comfy.lora

    model = _model(family)
    targets = names.Targets(model.model.diffusion_model)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    wrong = []
    for alias, to in key_map.items():
        if isinstance(to, tuple):
            key, offset = to[0], (to[1] if to[1] is not None else "swap_halves")
        else:
            key, offset = to, None
        want = (key[len("diffusion_model."):], offset)
        if want[0] not in targets.shapes:
            continue  # ComfyUI's table names layers of other variants too (Flux's controlnet pos_embed_input)
        got = targets.lookup(alias)
        if got != want:
            wrong.append((alias, want, got))
    assert len(key_map) > 50
    assert wrong == [], f"{len(wrong)} of {len(key_map)} names differ from ComfyUI's map, e.g. {wrong[:3]}"


@pytest.mark.parametrize("family,fmt", [(f, x) for f in dit_tiny.FAMILIES for x in dit_tiny.LORA_FORMATS[f]])
def test_fused_weights_equal_loraloader_and_restore_bit_exactly(comfy_host, lora, family, fmt, tmp_path):
    model = _model(family)
    if fmt == "diffusers" and family == "zimage":
        import comfy.utils

        if not hasattr(comfy.utils, "z_image_to_diffusers"):
            pytest.skip("this ComfyUI maps no diffusers Z-Image LoRA names")
    sd = dit_tiny.make_lora(model, family, fmt, seed=3)
    before = dit_tiny.weights(model)
    ref = dit_tiny.comfy_lora_weights(model, dit_tiny.comfy_reference_sd(sd, fmt, family), STRENGTH)
    assert dit_tiny.weights(model).keys() == before.keys()
    changed_by_comfy = {k for k in ref if not torch.equal(ref[k], before[k])}
    assert changed_by_comfy, "ComfyUI's LoraLoader changed nothing: the test file is not in a format it reads"

    unet = model.model.diffusion_model
    report = lora.apply_loras(unet, [lora.LoraSpec(_save(tmp_path, sd, f"{family}_{fmt}"), STRENGTH)])
    try:
        ours = dit_tiny.weights(model)
        changed = {k for k in ours if not torch.equal(ours[k], before[k])}
        assert changed == changed_by_comfy
        worst = max(float((ours[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-6)) for k in changed)
        assert worst < 1e-5, f"relative difference to LoraLoader {worst:.2e}"
        assert report.layers_changed == len(changed)
    finally:
        lora.apply_loras(unet, [])
    after = dit_tiny.weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_swaps_on_a_compiled_flux_never_recompile(comfy_host, lora, tmp_path):
    """Flux is the hard case: the diffusers LoRA lands in slices of the fused qkv / linear1."""
    model = _model("flux")
    unet = model.model.diffusion_model
    a = _save(tmp_path, dit_tiny.make_lora(model, "flux", "diffusers", seed=4), "a")
    b = _save(tmp_path, dit_tiny.make_lora(model, "flux", "kohya", seed=5), "b")
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    x, t, ctx, extra = dit_tiny.inputs("flux")
    import comfy.ldm.modules.attention as attn

    sdpa = (lambda func, *a, **k: attn.attention_pytorch(*a, **k)) if hasattr(attn, "wrap_attn") else None

    def kw():
        # as Compile Model does on the CPU: ComfyUI's sub-quadratic attention reads free memory on every call,
        # which a traced frame guards on (it recompiled here whenever an earlier test had moved free memory).
        # A fresh dict per call: Flux's forward writes into transformer_options.
        return {**extra, "transformer_options": {"optimized_attention_override": sdpa}} if sdpa else extra

    compiled = torch.compile(unet.forward, backend=backend)
    outs = []
    try:
        with torch.no_grad():
            for loras in ([], [(a, 1.0)], [(b, 0.7)], [(a, 0.5), (b, 0.5)], []):
                lora.apply_loras(unet, [lora.LoraSpec(p, s) for p, s in loras])
                out = compiled(x, t, ctx, **kw())
                torch.testing.assert_close(out, unet.forward(x, t, ctx, **kw()), rtol=1e-4, atol=1e-5)
                outs.append(out)
                if len(outs) == 1:
                    first = len(compiles)
    finally:
        lora.apply_loras(unet, [])
        torch._dynamo.reset()
    assert first >= 1 and len(compiles) == first, f"recompiled: {len(compiles) - first} more graphs after the first call"
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    assert torch.equal(outs[0], outs[-1])


@pytest.mark.parametrize("lora_family,model_family", [("wan", "qwen_image"), ("qwen_image", "wan"), ("flux", "zimage"), ("sd15", "flux"),
                                                      ("ltx", "wan"), ("wan", "ltx"), ("sd15", "ltx"), ("minimax", "ltx"), ("ltx", "minimax")])
def test_lora_for_another_family_is_refused_with_the_model_untouched(comfy_host, lora, lora_family, model_family, tmp_path):
    model = _model(model_family)
    if lora_family == "sd15":
        g = torch.Generator().manual_seed(0)
        sd = {f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{n}.lora_{d}.weight": torch.randn(8, 8, generator=g)
              for n in "qkv" for d in ("up", "down")}
        expect = "SD1.x/SD2.x/SDXL UNet"
    else:
        sd = dit_tiny.make_lora(_model(lora_family), lora_family, "comfy", seed=6)
        expect = {"wan": "Wan 2.x", "qwen_image": "Qwen-Image", "flux": "Flux / Chroma", "ltx": "LTX-Video", "minimax": "MiniMax H3"}[lora_family]
    path = _save(tmp_path, sd, f"{lora_family}_lora")
    before = dit_tiny.weights(model)
    with pytest.raises(Exception) as e:
        lora.apply_loras(model.model.diffusion_model, [lora.LoraSpec(path, 1.0)])
    assert type(e.value).__name__ == "SDAccelError"
    msg = str(e.value)
    assert "does not fit this model" in msg and f"made for a {expect}" in msg and "not changed" in msg, msg
    after = dit_tiny.weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
