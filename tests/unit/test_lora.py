"""LoRA hot-swap core on tiny diffusers UNets: formats, exact swap/remove, compiled models, bad input."""
import logging

import pytest
import torch
from safetensors.torch import save_file

from sd_accel.accel_core import SDAccelError
from sd_accel.accel_core.compiling import CompileConfig, compile
from sd_accel.accel_core.lora import LoraConfig, LoraSpec, UNetNames, apply_loras, lora_state, read_lora
from testkit.loras import FORMATS, make_random_lora


def _save(tmp_path, name, sd):
    p = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    return str(p)


def _weights(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _identity(unet):
    return {k: (p, p.data_ptr()) for k, p in unet.named_parameters()}


def _run(m, inputs):
    x, t, c = inputs
    with torch.no_grad():
        out = m(x, t, encoder_hidden_states=c)
    return out.sample if hasattr(out, "sample") else out[0]


def _expected(orig, unet, lora_sd_list):
    """orig weights + sum(strength * scale * up @ down), computed independently of the core (kohya/PEFT keys)."""
    exp = {k: v.float().clone() for k, v in orig.items()}
    names = UNetNames(unet)
    for sd, strength in lora_sd_list:
        for k, up in sd.items():
            if not k.endswith(".lora_up.weight") or k.startswith("lora_te"):
                continue
            base = k[: -len(".lora_up.weight")]
            down = sd[base + ".lora_down.weight"].float()
            alpha = float(sd[base + ".alpha"])
            ldm = base[len("lora_unet_"):]
            target = next(n for n, _ in unet.named_modules() if names.ldm_name(n) and names.ldm_name(n).replace(".", "_") == ldm)
            w = exp[target + ".weight"]
            exp[target + ".weight"] = w + strength * (alpha / down.shape[0]) * (up.float().flatten(1) @ down.flatten(1)).reshape(w.shape)
    return exp


@pytest.fixture
def two_loras(unet, tmp_path):
    a = make_random_lora(unet, "kohya-ldm", rank=4, seed=1)
    b = make_random_lora(unet, "kohya-ldm", rank=2, seed=2, scope="all", alpha=1.0)
    return (_save(tmp_path, "a.safetensors", a), a), (_save(tmp_path, "b.safetensors", b), b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_applies_the_same_deltas_and_restores_bit_exactly(unet, tmp_path, fmt):
    orig, ident = _weights(unet), _identity(unet)
    ref_sd = make_random_lora(unet, "kohya-ldm", rank=4, seed=3)
    ref_path = _save(tmp_path, "ref.safetensors", ref_sd)
    path = _save(tmp_path, f"{fmt}.safetensors", make_random_lora(unet, fmt, rank=4, seed=3))
    lf = read_lora(path)
    assert lf.text_encoder_keys == 2 and not lf.unused

    rep = apply_loras(unet, [LoraSpec(path, 0.7)])
    got = _weights(unet)
    apply_loras(unet, [])
    apply_loras(unet, [LoraSpec(ref_path, 0.7)])
    ref = _weights(unet)
    changed = [k for k in orig if not torch.equal(ref[k], orig[k])]
    if fmt == "diffusers-old":  # only attention projections exist in that format
        changed_here = [k for k in orig if not torch.equal(got[k], orig[k])]
        assert changed_here and all(".to_" in k for k in changed_here)
        for k in changed_here:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)
    else:
        assert rep.applied[0][2] == len(changed) > 10
        for k in orig:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)
    apply_loras(unet, [])
    for k, v in _weights(unet).items():
        assert torch.equal(v, orig[k]), k
    assert {k: (p, p.data_ptr()) for k, p in unet.named_parameters()} == ident
    assert not lora_state(unet).active


def test_weights_equal_independent_math(unet, two_loras):
    (pa, a), (pb, b) = two_loras
    orig = _weights(unet)
    apply_loras(unet, [LoraSpec(pa, 0.8), LoraSpec(pb, -0.5)])
    exp = _expected(orig, unet, [(a, 0.8), (b, -0.5)])
    got = _weights(unet)
    for k in orig:
        torch.testing.assert_close(got[k], exp[k], rtol=1e-5, atol=1e-6)


def test_swap_strength_remove_round_trips_without_drift(unet, two_loras, inputs):
    (pa, _), (pb, _) = two_loras
    orig, ident = _weights(unet), _identity(unet)
    ref_out = _run(unet, inputs)
    apply_loras(unet, [LoraSpec(pa, 1.0), LoraSpec(pb, 0.5)])
    both = _weights(unet)
    out_both = _run(unet, inputs)
    assert (out_both - ref_out).abs().max() > 1e-3  # the LoRAs really change the output
    for _ in range(3):  # swap, re-weight, remove one, add back: always computed from the exact originals
        apply_loras(unet, [LoraSpec(pb, 0.5)])
        apply_loras(unet, [LoraSpec(pa, 0.3)])
        apply_loras(unet, [LoraSpec(pa, 0.3), LoraSpec(pb, 1.0)])
        apply_loras(unet, [LoraSpec(pb, 0.5), LoraSpec(pa, 1.0)])
    for k, v in _weights(unet).items():
        assert torch.equal(v, both[k]), k
    assert torch.equal(_run(unet, inputs), out_both)
    only_b = apply_loras(unet, [LoraSpec(pb, 0.5)])
    assert only_b.changed and only_b.layers_changed > 0
    apply_loras(unet, [])
    for k, v in _weights(unet).items():
        assert torch.equal(v, orig[k]), k
    assert _identity(unet) == ident
    assert torch.equal(_run(unet, inputs), ref_out)


def test_same_set_is_a_no_op_and_report_says_so(unet, two_loras):
    (pa, _), _ = two_loras
    first = apply_loras(unet, [LoraSpec(pa, 1.0)])
    assert first.changed and "updated in place" in first.summary()
    again = apply_loras(unet, [LoraSpec(pa, 1.0)])
    assert not again.changed and again.layers_changed == 0 and "already applied" in again.summary()


def test_strength_zero_is_a_no_op(unet, two_loras):
    (pa, _), _ = two_loras
    orig = _weights(unet)
    rep = apply_loras(unet, [LoraSpec(pa, 0.0)])
    assert rep.applied == [] and not lora_state(unet).active
    for k, v in _weights(unet).items():
        assert torch.equal(v, orig[k])


def test_cpu_backup_device(unet, two_loras):
    (pa, _), _ = two_loras
    orig = _weights(unet)
    apply_loras(unet, [LoraSpec(pa, 1.0)], LoraConfig(backup_device="cpu"))
    assert all(t.device.type == "cpu" for t in lora_state(unet).originals.values())
    apply_loras(unet, [], LoraConfig(backup_device="cpu"))
    for k, v in _weights(unet).items():
        assert torch.equal(v, orig[k])


def test_replaced_parameter_is_taken_as_new_original(unet, two_loras, caplog):
    (pa, _), _ = two_loras
    apply_loras(unet, [LoraSpec(pa, 1.0)])
    pname = next(iter(lora_state(unet).originals))
    mod = unet.get_submodule(pname.rsplit(".", 1)[0])
    fresh = torch.nn.Parameter(torch.zeros_like(mod.weight), requires_grad=False)
    mod.weight = fresh  # another patcher swapped the tensor object (ComfyUI without weight_inplace_update does this)
    with caplog.at_level(logging.WARNING, logger="sd_accel"):
        apply_loras(unet, [])
    assert "replaced" in caplog.text
    assert torch.count_nonzero(mod.weight) == 0  # our stale copy was not written over the new tensor


# --- compiled models: zero recompiles ------------------------------------------------------------

def _recompile_free(cu, unet, inputs, sets):
    """Run the compiled UNet for each LoRA set under error_on_recompile; compare with the eager UNet."""
    for specs in sets:
        apply_loras(unet, specs)
        ref = _run(unet, inputs)
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = _run(cu, inputs)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_swaps_on_compiled_unet_do_not_recompile(unet, two_loras, inputs):
    (pa, _), (pb, _) = two_loras
    cu = compile(unet, CompileConfig(backend="inductor", torch_backend="eager", fullgraph=True))
    apply_loras(unet, [LoraSpec(pa, 1.0)])
    _run(cu, inputs)  # compiles once
    assert cu.report.status == "compiled"
    counters = torch._dynamo.utils.counters
    frames = sum(counters["frames"].values())
    _recompile_free(cu, unet, inputs, [[LoraSpec(pb, 1.0)], [LoraSpec(pb, 0.25)], [LoraSpec(pa, 1.0), LoraSpec(pb, 0.5)],
                                       [LoraSpec(pa, 0.5)], []])
    assert sum(counters["frames"].values()) - frames <= 5  # frames are counted per call; no new compiles happened
    assert counters["stats"]["unique_graphs"] == 1


def test_swaps_on_inductor_compiled_unet_do_not_recompile(unet, two_loras, inputs):
    (pa, _), (pb, _) = two_loras
    cu = compile(unet, CompileConfig(backend="inductor", fullgraph=True))
    _run(cu, inputs)
    assert cu.report.status == "compiled"
    _recompile_free(cu, unet, inputs, [[LoraSpec(pa, 1.0)], [LoraSpec(pb, 0.5)], [LoraSpec(pa, 1.0), LoraSpec(pb, 1.0)], []])


# --- names --------------------------------------------------------------------------------------

def test_diffusers_ldm_names_for_real_sd15_and_sdxl_layouts():
    from diffusers import UNet2DConditionModel

    from testkit.unets import SD15, SDXL

    with torch.device("meta"):
        sd15, sdxl = UNet2DConditionModel(**SD15), UNet2DConditionModel(**SDXL)
    n15, nxl = UNetNames(sd15), UNetNames(sdxl)
    assert n15.other("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert n15.other("down_blocks.0.downsamplers.0.conv") == "input_blocks.3.0.op"
    assert n15.other("mid_block.resnets.1.conv1") == "middle_block.2.in_layers.2"
    assert n15.other("up_blocks.1.upsamplers.0.conv") == "output_blocks.5.2.conv"
    assert n15.other("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.1.conv"
    assert n15.other("up_blocks.3.attentions.2.proj_out") == "output_blocks.11.1.proj_out"
    assert n15.other("time_embedding.linear_2") == "time_embed.2"
    assert nxl.other("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2") == "input_blocks.8.1.transformer_blocks.9.ff.net.2"
    assert nxl.other("add_embedding.linear_1") == "label_emb.0.0"
    assert nxl.other("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.2.conv"
    assert nxl.other("up_blocks.2.resnets.2.conv_shortcut") == "output_blocks.8.0.skip_connection"


# --- bad input ----------------------------------------------------------------------------------

def _untouched(unet, orig):
    for k, v in _weights(unet).items():
        assert torch.equal(v, orig[k]), k
    assert not lora_state(unet).active


def test_missing_file(unet, tmp_path):
    orig = _weights(unet)
    with pytest.raises(SDAccelError, match="does not exist"):
        apply_loras(unet, [LoraSpec(str(tmp_path / "nope.safetensors"))])
    _untouched(unet, orig)


def test_not_safetensors_and_corrupt(unet, tmp_path, two_loras):
    (pa, _), _ = two_loras
    orig = _weights(unet)
    txt = tmp_path / "notes.safetensors"
    txt.write_text("this is not a LoRA")
    pt = tmp_path / "old.pt"
    torch.save({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(pt))
    cut = tmp_path / "cut.safetensors"
    data = open(pa, "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    for bad in (txt, pt, cut):
        with pytest.raises(SDAccelError, match="not a readable safetensors"):
            apply_loras(unet, [LoraSpec(pa, 1.0), LoraSpec(str(bad), 1.0)])  # the good one is not applied either
        _untouched(unet, orig)


def test_file_without_lora_layers(unet, tmp_path):
    p = _save(tmp_path, "ckpt.safetensors", {"model.diffusion_model.out.2.weight": torch.zeros(4, 4, 3, 3)})
    with pytest.raises(SDAccelError, match="holds no LoRA layers"):
        apply_loras(unet, [LoraSpec(p)])
    loha = {"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)}
    with pytest.raises(SDAccelError, match="LoHa"):
        apply_loras(unet, [LoraSpec(_save(tmp_path, "loha.safetensors", loha))])


def test_dora_is_refused(unet, tmp_path):
    sd = make_random_lora(unet, "kohya-ldm", seed=4)
    base = next(k for k in sd if k.endswith(".lora_up.weight"))[: -len(".lora_up.weight")]
    sd[base + ".dora_scale"] = torch.ones(1, 4)
    with pytest.raises(SDAccelError, match="DoRA"):
        apply_loras(unet, [LoraSpec(_save(tmp_path, "dora.safetensors", sd))])


def test_lora_for_another_architecture(unet, tmp_path):
    """An SDXL-layout LoRA (linear proj_in, 2 transformer blocks, wider context) on an SD1.5-layout UNet."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    xl = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
                              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                              transformer_layers_per_block=(1, 2), use_linear_projection=True, sample_size=8, attention_head_dim=4)
    p = _save(tmp_path, "xl.safetensors", make_random_lora(xl, "kohya-diffusers", seed=5))
    orig = _weights(unet)
    with pytest.raises(SDAccelError, match=r"\d+ of \d+ layers matched") as e:
        apply_loras(unet, [LoraSpec(p)])
    assert "another size or version of this architecture" in str(e.value) and "not changed" in str(e.value)
    _untouched(unet, orig)


def test_real_size_sdxl_lora_on_sd15_names_the_match_count():
    from diffusers import UNet2DConditionModel

    from testkit.unets import SD15, SDXL

    with torch.device("meta"):
        sd15, sdxl = UNet2DConditionModel(**SD15), UNet2DConditionModel(**SDXL)
    sd = make_random_lora(sdxl, "kohya-ldm", rank=1, with_text_encoder=False, dtype=torch.float32)
    from sd_accel.accel_core.lora import LoraConfig, parse_lora

    lf = parse_lora(sd, "sdxl_style.safetensors")
    with pytest.raises(SDAccelError) as e:
        lora_state(sd15).resolve(lf, LoraConfig())
    msg = str(e.value)
    assert "sdxl_style.safetensors does not fit" in msg and "SD1.x UNet" in msg
    matched, total = map(int, msg.split("this model: ")[1].split(" layers")[0].split(" of "))
    assert total == len(lf.layers) and matched < total


def test_bad_spec_type(unet):
    with pytest.raises(SDAccelError, match="LoraSpec"):
        apply_loras(unet, ["a.safetensors"])
    with pytest.raises(SDAccelError, match="backup device"):
        LoraConfig(backup_device="disk")


def test_sdxl_layout_unet_all_formats(tmp_path):
    """SDXL-style blocks (linear proj, several transformer blocks, text_time embedding): all formats land."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    xl = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8, cross_attention_dim=24,
                              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                              transformer_layers_per_block=(1, 2), use_linear_projection=True, sample_size=8, attention_head_dim=4,
                              addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 24).eval()
    orig = _weights(xl)
    results = []
    for fmt in ("kohya-ldm", "kohya-diffusers", "peft"):
        p = _save(tmp_path, f"{fmt}.safetensors", make_random_lora(xl, fmt, seed=6, scope="all"))
        apply_loras(xl, [LoraSpec(p)])
        results.append(_weights(xl))
        apply_loras(xl, [])
    for r in results[1:]:
        for k in orig:
            torch.testing.assert_close(r[k], results[0][k], rtol=0, atol=1e-6)
    _untouched(xl, orig)


def test_scaled_weights_are_refused(unet, two_loras):
    (pa, _), _ = two_loras
    mod = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    mod.scale_weight = torch.tensor(0.5)  # what ComfyUI's scaled-fp8 ops carry
    orig = _weights(unet)
    with pytest.raises(SDAccelError, match="scaled or quantized"):
        apply_loras(unet, [LoraSpec(pa, 1.0)])
    _untouched(unet, orig)


def test_order_of_the_set_does_not_matter(unet, two_loras):
    (pa, _), (pb, _) = two_loras
    apply_loras(unet, [LoraSpec(pa, 1.0), LoraSpec(pb, 0.5)])
    w = _weights(unet)
    rep = apply_loras(unet, [LoraSpec(pb, 0.5), LoraSpec(pa, 1.0)])
    assert not rep.changed and rep.layers_changed == 0
    assert all(torch.equal(v, w[k]) for k, v in _weights(unet).items())


def test_factors_move_in_one_copy_per_dtype_and_keep_their_shapes():
    """move_factors batches the first host-to-device copy; each layer then has its own 2-D factors there."""
    from sd_accel.accel_core.lora_file import LoraLayer, move_factors

    g = torch.Generator().manual_seed(0)
    lin = LoraLayer("a", torch.randn(8, 2, generator=g, dtype=torch.float16), torch.randn(2, 6, generator=g, dtype=torch.float16), None, 1.0)
    conv = LoraLayer("b", torch.randn(4, 2, 1, 1, generator=g), torch.randn(2, 3, 3, 3, generator=g), None, None)
    want = {l.base: l.delta(s, "cpu") for l, s in ((lin, (8, 6)), (conv, (4, 3, 3, 3)))}
    move_factors([lin, conv], "meta")  # a device that is not the CPU, without a GPU
    for l, up in ((lin, (8, 2)), (conv, (4, 2))):
        u, d = l.factors("meta")
        assert u.device.type == "meta" and u.dtype == torch.float32 and tuple(u.shape) == up
        assert d.shape[0] == 2 and d.is_contiguous()
    acc = torch.zeros(4, 3, 3, 3)
    conv.add_to(acc, 0.5)  # back on the CPU: the same delta, in one fused kernel
    assert torch.allclose(acc, 0.5 * want["b"], atol=1e-6)
    assert torch.allclose(lin.add_to(torch.ones(8, 6), 1.0), 1 + want["a"], atol=1e-5)
