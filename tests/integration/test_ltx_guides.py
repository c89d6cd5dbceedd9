"""LTX-2.3's options, and the keyframe / reference guides of LTX-Video, LTX-2 and MiniMax H3, in a real ComfyUI.

- LTX-2.3: ComfyUI 0.33's `LTXAVModel` built from a file whose metadata config turns on what the released LTX-2.3
  files turn on (gated attention, AdaLN text cross-attention, ...; dit_models.SPECS["ltx23"]), through every node:
  Compile Model, Step Cache, FP16 Cast, fp8's exclusions, LoRA Hot-Swap's name map and an IC-LoRA's metadata.
- Guides: the host's own nodes (`LTXVImgToVideo`, `LTXVAddGuide`, `LTXVConcatAVLatent`, `LTXVCropGuides`;
  `MiniMaxH3AddGuide`) on the reduced models. The guide frames ride in the latent (LTX: appended frames, a denoise
  mask, per-token timesteps, `keyframe_idxs`; MiniMax H3: condition rows packed before the targets). Compiled: equal
  to eager, and a second run traces nothing; Step Cache: the scheduled calls cached, a bounded change.

The VAEs are stand-ins (`StandInVAE`, `StandInAudioVAE`): the nodes only call their `encode` (and read
`downscale_index_formula`), and what is under test is the diffusion model. Dynamo's "eager" backend: tracing, guards and recompiles are tested here.
"""
from __future__ import annotations

import inspect
import pytest
import torch
from safetensors.torch import save_file

import comfy_harness as harness
import dit_models
import dit_tiny

GUIDED = ("ltx", "ltx2", "ltx23", "minimax")


class StandInVAE:
    """What the guide nodes use of a VAE: `encode(pixels [F, H, W, 3])` -> a seeded projection of the
    pooled pixels, [1, channels, latent frames, H / scale, W / scale]; `downscale_index_formula`."""

    def __init__(self, channels: int, time_scale: int, scale: int):
        self.channels, self.time_scale, self.scale = channels, time_scale, scale
        self.downscale_index_formula = (time_scale, scale, scale)
        self.proj = torch.randn(3, channels, generator=torch.Generator().manual_seed(7))

    def encode(self, pixels):
        frames = (pixels.shape[0] - 1) // self.time_scale + 1
        x = pixels[:, :, :, :3].movedim(-1, 0).unsqueeze(0).float()
        x = torch.nn.functional.adaptive_avg_pool3d(x, (frames, pixels.shape[1] // self.scale, pixels.shape[2] // self.scale))
        return torch.einsum("bcfhw,cd->bdfhw", x, self.proj)


class StandInAudioVAE:
    """What MiniMaxH3AddGuide uses of an audio VAE: `encode(waveform [1, samples, 2])` -> [1, 32, 2, samples / 64]
    (a seeded projection of the pooled samples) at `audio_sample_rate`."""

    audio_sample_rate = 32000

    def __init__(self):
        self.proj = torch.randn(32, generator=torch.Generator().manual_seed(8))

    def encode(self, waveform):
        x = torch.nn.functional.avg_pool1d(waveform.movedim(-1, 1).float(), 64)  # [1, 2, T]
        return torch.einsum("bct,d->bdct", x, self.proj)


_models: dict = {}


def _model(fam: str, tmp_path_factory):
    reason = dit_models.available(fam)
    if reason:
        pytest.skip(reason)
    if fam not in _models:
        _models[fam] = dit_models.build(fam, tmp=tmp_path_factory.mktemp(fam))
    return _models[fam]


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _compiled(host, model):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = host.pack_module("accel_core.compiling").CompileConfig(torch_backend="eager")
    return host.pack_module("accel_core.hosts.comfy").apply_compile(model, cfg)


def _out(node_output):
    return node_output.result if hasattr(node_output, "result") else node_output


def _image(seed: int, size: int):
    return torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(seed))


def _takes(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def guided(fam: str, iclora: dict | None = None):
    """(positive, negative, latent, what) for a guided sampling run of `fam`, made by the host's own nodes.

    LTX: `LTXVImgToVideo` conditions the first frame in place (a denoise mask), `LTXVAddGuide` appends a keyframe
    for the last frame (strength 0.8: 0.33 turns it into a guide attention mask; LTX-2.3 adds it as an IC-LoRA
    reference with a downscale factor where the node takes one); an AV model then gets its audio stream beside it
    (`LTXVConcatAVLatent`). MiniMax H3: `MiniMaxH3AddGuide` anchors the first frame with a soundtrack and the
    last frame."""
    pos, neg = dit_models.conditioning(fam)
    if fam == "minimax":
        import comfy_extras.nodes_minimax_h3 as mh

        latent = dit_models.latent(fam)
        vae = StandInVAE(24, 4, 16)
        audio = {"waveform": torch.randn(1, 2, 4 * 64, generator=torch.Generator().manual_seed(2)), "sample_rate": 32000}
        pos = _out(mh.MiniMaxH3AddGuide.execute(pos, latent, 0, vae=vae, audio_vae=StandInAudioVAE(), image=_image(0, 128), audio=audio))[0]
        pos = _out(mh.MiniMaxH3AddGuide.execute(pos, latent, -1, vae=vae, image=_image(1, 128)))[0]
        keyframes = pos[0][1]["minimax_keyframes"]
        assert [sorted(k) for k in keyframes] == [["audio_latent", "latent", "resolved_frame_index"], ["latent", "resolved_frame_index"]]
        return pos, neg, latent, {"keyframes": keyframes}
    import comfy_extras.nodes_lt as lt

    vae = StandInVAE(128, 8, 32)
    pos, neg, video = _out(lt.LTXVImgToVideo.execute(pos, neg, _image(0, 256), vae, 256, 256, 17, 1, 1.0))
    extra = {}
    if iclora is None and fam == "ltx23" and _takes(lt.LTXVAddGuide.execute, "iclora_parameters"):
        iclora = {"reference_downscale_factor": 2}
    if iclora is not None:
        extra["iclora_parameters"] = iclora
    pos, neg, video = _out(lt.LTXVAddGuide.execute(pos, neg, vae, video, _image(1, 256), -1, 0.8, **extra))
    latent = video
    if dit_models.SPECS[fam].audio_shape is not None:
        latent = _out(lt.LTXVConcatAVLatent.execute(video, {"samples": torch.zeros(dit_models.SPECS[fam].audio_shape)}))[0]
    return pos, neg, latent, {"first": vae.encode(_image(0, 256))[:, :, :1], **extra}


def sample(model, pos, neg, latent, steps: int = 3, cfg: float = 2.0) -> dict:
    import nodes

    with torch.inference_mode():
        return nodes.common_ksampler(model, 42, steps, cfg, "euler", "simple", pos, neg, latent)[0]


# --- LTX-2.3 ---------------------------------------------------------------------------------------

def test_an_ltx23_file_turns_its_options_on_and_is_ltx2(comfy_host, tmp_path_factory):
    """ComfyUI's detection reads the options from the file's metadata: every attention has its per-head gate, every
    block its text-cross-attention modulation; the family is LTX-2's, with the same compile units."""
    model = _model("ltx23", tmp_path_factory)
    dm = model.get_model_object("diffusion_model")
    fam = comfy_host.pack_module("accel_core.families").family_of(dm)
    assert fam is not None and fam.name == "ltx2"
    assert dm.cross_attention_adaln and dm.apply_gated_attention and dm.prompt_adaln_single is not None
    attn = [m for n, m in dm.transformer_blocks.named_modules() if n.endswith(("attn1", "attn2", "_attn"))]
    assert len(attn) == 6 * len(dm.transformer_blocks) and all(a.to_gate_logits is not None for a in attn)
    assert all(b.prompt_scale_shift_table.shape[0] == 2 and b.scale_shift_table.shape[0] == 9 for b in dm.transformer_blocks)
    assert [len(mods) for _, mods in fam.block_lists(dm)] == [3]


def test_ltx23_compile_matches_eager_in_one_frame_and_a_second_run_traces_nothing(comfy_host, tmp_path_factory):
    model = _model("ltx23", tmp_path_factory)
    ref = dit_models.sample(model, "ltx23")
    compiled = _compiled(comfy_host, model)
    out = dit_models.sample(compiled, "ltx23")
    assert harness.rel_err(out, ref) < 1e-4
    assert _graphs() == 1  # the three blocks share one frame
    assert torch.equal(dit_models.sample(compiled, "ltx23"), out)
    assert _graphs() == 1
    assert comfy_host.pack_module("accel_core.hosts.comfy").compile_report(compiled)["status"] == "compiled"


def test_ltx23_step_cache_interval_1_is_eager_and_the_schedule_caches_with_a_bounded_change(comfy_host, tmp_path_factory,
                                                                                            stepcache_stats):
    model = _model("ltx23", tmp_path_factory)
    steps = 6
    ref = dit_models.sample(model, "ltx23", steps=steps, cfg=2.0)
    assert torch.equal(dit_models.sample(harness.step_cache(comfy_host, model, interval=1), "ltx23", steps=steps, cfg=2.0), ref)
    out = dit_models.sample(harness.step_cache(comfy_host, model, interval=3), "ltx23", steps=steps, cfg=2.0)
    assert sorted(set(stepcache_stats[-1]["cached_steps"])) == [1, 2, 4, 5], stepcache_stats[-1]
    assert 0 < harness.rel_err(out, ref) < 0.5


def test_ltx23_fp16_cast_keeps_nothing_fp32_and_fp8_leaves_the_modulation_and_the_gates(comfy_host, comfy_cast, tmp_path_factory):
    """Nothing of LTX-2.3 is fp32 in the class. fp8 leaves every timestep modulation (adaln_single and the new
    prompt_adaln_single pair), the per-head gate logits (one value per head: a 16-row matmul whose activation
    would be quantized for nothing) and the text connectors (run once per sampling run) in the compute dtype."""
    model = _model("ltx23", tmp_path_factory)
    ref = dit_models.sample(model, "ltx23")
    castmod = comfy_host.pack_module("accel_core.casting")
    cast = comfy_cast.apply_cast(model, castmod.CastConfig(dtype="bf16", channels_last=False))
    unet = cast.get_model_object("diffusion_model")
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert harness.rel_err(dit_models.sample(cast, "ltx23"), ref) < 0.1
    fp8 = comfy_host.pack_module("accel_core.fp8")
    copy = castmod.cast(model.get_model_object("diffusion_model"), castmod.CastConfig(dtype="bf16", channels_last=False), device_type="cpu")
    fp8.to_fp8(copy)
    converted = [n for n, m in copy.named_modules() if isinstance(m, fp8.FP8Linear)]
    gates = [m for n, m in copy.transformer_blocks.named_modules() if n.endswith("to_gate_logits")]
    assert converted and gates and all(m.weight.shape[0] % 16 == 0 for m in gates)  # fp8 could take them
    assert not [n for n in converted if "adaln_single" in n or "to_gate_logits" in n or "embeddings_connector" in n]
    assert any(".to_q" in n for n in converted)


def test_ltx23_lora_names_resolve_as_comfyui_maps_them_and_fuse_as_loraloader(comfy_host, tmp_path):
    """The new layers (the gates, the prompt modulation) are ComfyUI's module names: every name ComfyUI maps resolves
    to the same weight, and a LoRA over every block linear fuses as ComfyUI's LoraLoader patches it."""
    import comfy.lora

    reason = dit_models.available("ltx23")
    if reason:
        pytest.skip(reason)
    names, lora = comfy_host.pack_module("accel_core.lora_names"), comfy_host.pack_module("accel_core.lora")
    model = dit_tiny.tiny_model("ltx23")
    unet = model.model.diffusion_model
    targets = names.Targets(unet)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    new = {k: v for k, v in key_map.items() if isinstance(v, str) and ("to_gate_logits" in v or "prompt_adaln" in v)}
    assert len(new) > 20
    assert all(targets.lookup(k) == (v[len("diffusion_model."):], None) for k, v in new.items())
    sd = dit_tiny.make_lora(model, "ltx23", "comfy", seed=3)
    assert any("to_gate_logits" in k for k in sd)
    before = dit_tiny.weights(model)
    ref = dit_tiny.comfy_lora_weights(model, sd, 0.8)
    f = str(tmp_path / "ltx23.safetensors")
    save_file(sd, f)
    lora.apply_loras(unet, [lora.LoraSpec(f, 0.8)])
    try:
        ours = dit_tiny.weights(model)
        changed = {k for k in ours if not torch.equal(ours[k], before[k])}
        assert changed == {k for k in ref if not torch.equal(ref[k], before[k])}
        assert any("to_gate_logits" in k for k in changed)
        assert max(float((ours[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-6)) for k in changed) < 1e-5
    finally:
        lora.apply_loras(unet, [])
    assert all(torch.equal(v, before[k]) for k, v in dit_tiny.weights(model).items())


# --- keyframe / reference guides --------------------------------------------------------------------

def _cropped(fam: str, pos, neg, samples: dict) -> torch.Tensor:
    """The sampled video with the appended guide frames cropped off by the host's nodes."""
    import comfy_extras.nodes_lt as lt

    if samples["samples"].is_nested:
        samples = _out(lt.LTXVSeparateAVLatent.execute(samples))[0]
    return _out(lt.LTXVCropGuides.execute(pos, neg, samples))[2]["samples"]


@pytest.mark.parametrize("fam", GUIDED)
def test_guided_sampling_compiles_once_equals_eager_and_caches_steps(comfy_host, tmp_path_factory, stepcache_stats, fam):
    """A guided run (guide frames in the latent, a denoise mask, per-token timesteps; LTX-2.3 with an IC-LoRA
    reference at half resolution, MiniMax H3 with two anchored frames) compiled: equal to eager, the graphs of the
    first run only (LTX: one frame; MiniMax H3: its text layouts, cond with the guides and uncond without, each with
    the first step's rows and the later steps'), none on a second run. Step Cache: the scheduled calls cached, the
    result near eager's (MiniMax H3 also with cfg "shared", its cond and uncond of different lengths); the guide
    frames come out as they went in."""
    model = _model(fam, tmp_path_factory)
    pos, neg, latent, what = guided(fam)
    seen = []  # what the first block gets: its tokens and the self-attention mask

    def look(_, args, kwargs):
        x = args[0][0] if isinstance(args[0], (tuple, list)) else args[0]
        seen.append((x.shape[1], type(kwargs.get("self_attention_mask")).__name__))

    blocks = model.get_model_object("diffusion_model").transformer_blocks if fam != "minimax" else None
    hook = blocks[0].register_forward_pre_hook(look, with_kwargs=True) if blocks is not None else None
    try:
        ref = sample(model, pos, neg, latent)
    finally:
        if hook is not None:
            hook.remove()
    if blocks is not None:  # 4 latent frames of 64 tokens; an IC-LoRA reference at half size keeps a quarter of its frame
        import comfy.ldm.lightricks.model as ltx_model

        mask = "GuideAttentionMask" if hasattr(ltx_model, "GuideAttentionMask") else "NoneType"  # 0.33: strength 0.8 attenuates
        assert set(seen) == {(3 * 64 + (16 if "iclora_parameters" in what else 64), mask)}, set(seen)
    plain = sample(model, *dit_models.conditioning(fam), dit_models.latent(fam))
    assert dit_models.flat(ref["samples"]).shape != dit_models.flat(plain["samples"]).shape or \
        harness.rel_err(dit_models.flat(ref["samples"]), dit_models.flat(plain["samples"])) > 1e-3  # the guides matter
    compiled = _compiled(comfy_host, model)
    out = sample(compiled, pos, neg, latent)
    assert harness.rel_err(dit_models.flat(out["samples"]), dit_models.flat(ref["samples"])) < 1e-4
    first = _graphs()
    assert first == (4 if fam == "minimax" else 1), first
    again = sample(compiled, pos, neg, latent)
    assert torch.equal(dit_models.flat(again["samples"]), dit_models.flat(out["samples"]))
    assert _graphs() == first, "the second guided run traced again"
    cached = sample(harness.step_cache(comfy_host, model, interval=2), pos, neg, latent)
    assert sorted(set(stepcache_stats[-1]["cached_steps"])) == [1], stepcache_stats[-1]
    assert 0 < harness.rel_err(dit_models.flat(cached["samples"]), dit_models.flat(ref["samples"])) < 0.5
    if fam == "minimax":  # cond (with the guides' rows) is longer than uncond: "shared" keeps a lane for each and caches
        sample(harness.step_cache(comfy_host, model, interval=2, cfg="shared"), pos, neg, latent)
        assert stepcache_stats[-1]["lanes"] == 2 and stepcache_stats[-1]["cached_steps"] == [1, 1], stepcache_stats[-1]
    else:  # the appended keyframe cropped off, the conditioned first frame (strength 1) kept, in every run
        for s in (ref, out, cached):
            video = _cropped(fam, pos, neg, s)
            assert video.shape == (1, 128, 3, 8, 8)
            assert torch.allclose(video[:, :, :1], what["first"], rtol=1e-5, atol=1e-6)


def test_an_ic_lora_through_hot_swap_gives_its_parameters_and_samples_as_loraloader(comfy_host, tmp_path_factory, tmp_path):
    """An IC-LoRA carries its reference_downscale_factor in its file's metadata, which LTX's GetICLoRAParameters reads
    from the model LoraLoader made. LoRA Hot-Swap's model carries it the same way; the guided run (the reference at
    that factor) compiled with the hot-swapped LoRA equals LoraLoader's eager run."""
    import comfy.sd
    import comfy_extras.nodes_lt as lt

    model = _model("ltx23", tmp_path_factory)
    if not hasattr(lt, "GetICLoRAParameters"):
        pytest.skip("this ComfyUI has no GetICLoRAParameters node (IC-LoRA parameters are newer)")
    meta = {"reference_downscale_factor": "2"}
    sd = dit_tiny.make_lora(model, "ltx23", "comfy", seed=4)
    path = tmp_path / "ic_lora.safetensors"
    save_file(sd, str(path), metadata=meta)
    theirs = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0, lora_metadata=meta)[0]
    ours = comfy_host.pack_module("accel_core.hosts.comfy.lora").apply_hotswap(model, str(path), 1.0)
    params = _out(lt.GetICLoRAParameters.execute(ours))[0]
    assert params == _out(lt.GetICLoRAParameters.execute(theirs))[0] == {"reference_downscale_factor": 2}
    pos, neg, latent, _ = guided("ltx23", params)
    ref = dit_models.flat(sample(theirs, pos, neg, latent)["samples"])
    assert harness.rel_err(ref, dit_models.flat(sample(model, pos, neg, latent)["samples"])) > 1e-3  # the LoRA matters
    out = dit_models.flat(sample(_compiled(comfy_host, ours), pos, neg, latent)["samples"])
    assert harness.rel_err(out, ref) < 1e-4
