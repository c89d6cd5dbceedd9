"""The family registry and the regional compile, without a host: plain torch stand-ins named
like the host classes (the probes look at class names and attributes only)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sd_accel.accel_core import families, regional
from sd_accel.accel_core.compiling import CompileConfig
from sd_accel.accel_core.errors import SDAccelError


class DoubleStreamBlock(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.img, self.txt = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, img, txt, vec, transformer_options={}):
        return img + self.img(img) * vec, txt + self.txt(txt)


class SingleStreamBlock(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, img, vec, transformer_options={}):
        return img + torch.tanh(self.lin(img)) * vec


class Flux(nn.Module):
    """The shape of ComfyUI's Flux forward: each block is offered to a replacement with its
    args and the original block call (a closure), as comfy/ldm/flux/model.py does."""

    def __init__(self, double=3, single=4):
        super().__init__()
        self.double_blocks = nn.ModuleList(DoubleStreamBlock() for _ in range(double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock() for _ in range(single))

    def forward(self, img, txt, vec, replace=None):
        replace = replace or {}
        for i, block in enumerate(self.double_blocks):
            if ("double_block", i) in replace:
                def block_wrap(args):
                    out = {}
                    out["img"], out["txt"] = block(img=args["img"], txt=args["txt"], vec=args["vec"])
                    return out
                out = replace[("double_block", i)]({"img": img, "txt": txt, "vec": vec}, {"original_block": block_wrap})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img=img, txt=txt, vec=vec)
        img = torch.cat((txt, img), 1)
        for i, block in enumerate(self.single_blocks):
            if ("single_block", i) in replace:
                def block_wrap(args):
                    return {"img": block(args["img"], vec=args["vec"])}
                img = replace[("single_block", i)]({"img": img, "vec": vec}, {"original_block": block_wrap})["img"]
            else:
                img = block(img, vec=vec)
        return img


def _replacements(rc):
    return {key: (lambda kind, name: lambda args, extra: rc.run(kind, name, extra["original_block"], args))(kind, name)
            for key, (kind, name) in rc.targets.items()}


def _inputs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, 16, generator=g), torch.randn(1, 3, 16, generator=g), torch.randn(1, 1, 16, generator=g)


def test_registry_recognises_by_class_name_and_attributes():
    fam = families.family_of(Flux())
    assert fam is not None and fam.name == "flux"
    assert families.family_of(nn.Linear(2, 2)) is None
    assert families.family_of("not a module") is None
    names = [f.name for f in families.families()]
    assert names[:2] == ["ldm", "diffusers"] and {"flux", "qwen_image", "zimage", "wan"} <= set(names)


def test_regions_group_identical_blocks_by_kind():
    m = Flux(double=3, single=4)
    groups = families.family_of(m).regions(m)
    assert {k: len(v) for k, v in groups.items()} == {"double_blocks:DoubleStreamBlock": 3, "single_blocks:SingleStreamBlock": 4}


def test_require_names_what_is_supported():
    with pytest.raises(SDAccelError) as e:
        families.skip_count(Flux())
    msg = str(e.value)
    assert "expected one of" in msg and "SD1.x/SD2.x/SDXL UNet" in msg and "Flux" in msg and "left unchanged" in msg


def test_regional_compile_one_frame_per_kind_and_no_recompile():
    from torch._dynamo.utils import counters

    m = Flux()
    img, txt, vec = _inputs()
    with torch.no_grad():
        ref = m(img, txt, vec)
        torch._dynamo.reset()
        counters.clear()
        rc = regional.RegionalCompiled(m, families.family_of(m), CompileConfig(torch_backend="eager"))
        with rc.calling():
            out = m(img, txt, vec, _replacements(rc))
        assert torch.allclose(out, ref, atol=1e-6)
        assert regional.dynamo_graphs() == 2  # 3 double + 4 single blocks: one frame per kind
        with rc.calling():
            m(*_inputs(seed=1), _replacements(rc))
        assert regional.dynamo_graphs() == 2 and not counters["recompiles"]
    assert rc.report.status == "compiled" and rc.report.units_compiled == 2
    assert "regional: 7 blocks in 2 kinds" in rc.report.target


@pytest.mark.parametrize("mode,runs", [("reduce-overhead", "default"), ("max-autotune", "max-autotune-no-cudagraphs"), ("default", "default")])
def test_blocks_compile_without_cuda_graphs(monkeypatch, mode, runs):
    """CUDA graph trees free one compiled call's outputs at the next compiled call (pytorch#152887), and
    block i's output is block i+1's input: blocks compiled one by one never ask for graphs."""
    seen = []
    backend = regional.BACKENDS["inductor"]
    monkeypatch.setattr(type(backend), "compile", lambda self, fn, owner, config: seen.append(config.mode) or fn)
    m = Flux()
    rc = regional.RegionalCompiled(m, families.family_of(m), CompileConfig(mode=mode))
    with torch.no_grad(), rc.calling():
        m(*_inputs(), _replacements(rc))
    assert seen and set(seen) == {runs} and rc.report.mode == runs and rc.config.mode == runs


def test_a_failing_block_runs_eager_and_is_named():
    m = Flux()
    bad = m.single_blocks[2]

    def forward(img, vec, transformer_options={}):
        torch._dynamo.graph_break()  # fullgraph cannot take this block
        return SingleStreamBlock.forward(bad, img, vec)

    bad.forward = forward
    img, txt, vec = _inputs()
    with torch.no_grad():
        ref = m(img, txt, vec)
        torch._dynamo.reset()
        rc = regional.RegionalCompiled(m, families.family_of(m), CompileConfig(torch_backend="eager", fullgraph=True))
        with rc.calling():
            out = m(img, txt, vec, _replacements(rc))
    assert torch.allclose(out, ref, atol=1e-6)
    assert list(rc.report.fallbacks) == ["single_blocks.2"] and rc.report.status == "partial"


def test_fallback_off_raises():
    m = Flux()
    m.double_blocks[0].forward = lambda **kw: (torch._dynamo.graph_break(), DoubleStreamBlock.forward(m.double_blocks[0], **kw))[1]
    torch._dynamo.reset()
    rc = regional.RegionalCompiled(m, families.family_of(m), CompileConfig(torch_backend="eager", fullgraph=True, fallback=False))
    with pytest.raises(Exception), torch.no_grad(), rc.calling():
        m(*_inputs(), _replacements(rc))


class LTXVModel(nn.Module):
    """The attributes the LTX-Video probe reads (ComfyUI's comfy/ldm/lightricks/model.py)."""

    def __init__(self):
        super().__init__()
        self.patchify_proj, self.adaln_single = nn.Linear(4, 8), nn.Linear(8, 48)
        self.transformer_blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))


class LTXAVModel(LTXVModel):
    """LTX-2's audio-video model subclasses LTX-Video's, with blocks of another calling convention (av_model.py)."""

    def __init__(self):
        super().__init__()
        self.audio_patchify_proj, self.audio_adaln_single = nn.Linear(4, 8), nn.Linear(8, 48)


def test_ltx_video_and_ltx2_are_families_of_their_own():
    fam = families.family_of(LTXVModel())
    assert fam is not None and fam.name == "ltx"
    assert [(bl.attr, bl.patch, len(m)) for bl, m in fam.block_lists(LTXVModel())] == [("transformer_blocks", "double_block", 3)]
    av = families.family_of(LTXAVModel())
    assert av is not None and av.name == "ltx2"  # the subclass is not LTX-Video: its blocks take a (video, audio) pair
    assert [(bl.attr, bl.patch, len(m)) for bl, m in av.block_lists(LTXAVModel())] == [("transformer_blocks", "double_block", 3)]
    # fp8 leaves the timestep modulation, LTX-2.3's per-head gates and the text connectors; nothing is pinned fp32
    assert av.fp8_skip == ("adaln_single", "to_gate_logits", "embeddings_connector") and not av.keeps_dtype("audio_adaln_single.linear.weight")


def test_a_lora_s_family_is_guessed_from_the_registrations_hints():
    from sd_accel.accel_core.lora_names import guess_family

    assert guess_family(["diffusion_model.transformer_blocks.0.attn1.to_q", "diffusion_model.adaln_single.linear"]) == "ltx"
    assert guess_family(["diffusion_model.transformer_blocks.0.attn1.to_q", "diffusion_model.transformer_blocks.0.audio_to_video_attn.to_q"]) == "ltx2"
    assert guess_family(["lora_unet_transformer_blocks_0_attn1_to_q", "lora_unet_transformer_blocks_0_audio_ff_net_0_proj"]) == "ltx2"
    assert guess_family(["lora_unet_blocks_0_self_attn_q"]) == "wan"
    # an SD LoRA names attn1 layers too: the tie goes to the UNets, registered first
    assert guess_family(["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]) == "unet"
    assert guess_family(["something_else"]) is None


class MiniMaxH3Model(nn.Module):
    """The attributes the MiniMax H3 probe reads; `use_adaln_curves` is the curve-form checkpoint's flag."""

    def __init__(self, curves=False):
        super().__init__()
        self.use_adaln_curves = curves
        self.video_patch_proj, self.token_refiner = nn.Linear(4, 8), nn.Linear(8, 8)
        self.blocks = nn.ModuleList(nn.Module() for _ in range(2))
        for b in self.blocks:
            b.attn, b.adaln_proj = nn.Linear(8, 8), nn.Linear(8, 8)


def test_minimax_keeps_its_fp32_parts_and_the_curve_form_adaln_in_their_dtype():
    plain, curves = MiniMaxH3Model(), MiniMaxH3Model(curves=True)
    fam = families.family_of(plain)
    assert fam is not None and fam.name == "minimax"
    assert fam.keeps_dtype("video_patch_proj.weight", plain) and fam.keeps_dtype("final_layer.video_out.bias", plain)
    assert fam.keeps_dtype("rope.inv_freq", plain)  # a buffer: the cast leaves it too
    assert not fam.keeps_dtype("blocks.0.attn.weight", plain)
    assert not fam.keeps_dtype("blocks.1.adaln_proj.linear.weight", plain)  # built in the model's dtype
    assert fam.keeps_dtype("blocks.1.adaln_proj.linear.weight", curves)  # built fp32 in the curve form
    assert not fam.keeps_dtype("blocks.1.adaln_projx.weight", curves)  # whole segments only


def test_cast_copy_keeps_the_family_s_buffers_in_their_dtype():
    from sd_accel.accel_core.casting import cast_copy

    m = MiniMaxH3Model()
    m.rope = nn.Module()
    m.rope.register_buffer("inv_freq", torch.rand(4))
    m.register_buffer("scratch", torch.rand(3))
    c = cast_copy(m, torch.bfloat16, channels_last=False)
    assert c.rope.inv_freq.dtype == torch.float32 and c.scratch.dtype == torch.bfloat16
    assert c.video_patch_proj.weight.dtype == torch.float32 and c.blocks[0].attn.weight.dtype == torch.bfloat16
