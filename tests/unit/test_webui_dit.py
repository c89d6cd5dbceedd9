"""Forge Neo's DiT models on the webui adapter (no webui needed): a stand-in of Neo's Flux.

The stand-in keeps what the adapter relies on in Neo's `backend/nn/flux.py`: the class name,
`double_blocks` / `single_blocks`, and a forward that offers block i to
`transformer_options["patches_replace"]["dit"][("double_block", i)]` with Neo's arguments and
`original_block`. The real Neo classes run in tests/integration/test_webui_neo_dit.py.
"""
import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sd_accel.accel_core.families import family_of
from sd_accel.accel_core.hosts import webui as w
from sd_accel.accel_core.hosts.webui.forge_dit import DitWrapper
from sd_accel.accel_core.hosts.webui.forge_wrapper import ForgeWrapper

D = 16


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, D)


class DoubleStreamBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_attn = _Attn()
        self.txt_mlp = nn.Linear(D, D)

    def forward(self, img, txt, vec, pe, attn_mask=None, transformer_options={}):
        return img + torch.tanh(self.img_attn.qkv(img)) * vec, txt + torch.tanh(self.txt_mlp(txt))


class SingleStreamBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = nn.Linear(D, D)

    def forward(self, x, vec, pe, attn_mask=None, transformer_options={}):
        return x + torch.tanh(self.linear1(x)) * vec


class IntegratedFluxTransformer2DModel(nn.Module):
    """Neo's Flux, reduced: its block loop and `patches_replace["dit"]` hooks as in backend/nn/flux.py."""

    def __init__(self):
        super().__init__()
        self.img_in, self.txt_in, self.time_in, self.final = nn.Linear(4, D), nn.Linear(8, D), nn.Linear(1, D), nn.Linear(D, 4)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock() for _ in range(2)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock() for _ in range(2)])

    def forward(self, x, timestep, context, transformer_options={}, **kwargs):
        b, c, h, wd = x.shape
        img = self.img_in(x.flatten(2).transpose(1, 2))
        txt = self.txt_in(context)
        vec = self.time_in(timestep[:, None].float() / 1000)[:, None]
        pe = None
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.double_blocks):
            if ("double_block", i) in blocks_replace:
                def block_wrap(args):
                    out = {}
                    out["img"], out["txt"] = block(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"], transformer_options=args.get("transformer_options"))
                    return out

                out = blocks_replace[("double_block", i)]({"img": img, "txt": txt, "vec": vec, "pe": pe, "transformer_options": transformer_options}, {"original_block": block_wrap})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img=img, txt=txt, vec=vec, pe=pe, transformer_options=transformer_options)
        img = torch.cat((txt, img), 1)
        for i, block in enumerate(self.single_blocks):
            if ("single_block", i) in blocks_replace:
                def block_wrap(args):
                    return {"img": block(args["img"], vec=args["vec"], pe=args["pe"], transformer_options=args.get("transformer_options"))}

                img = blocks_replace[("single_block", i)]({"img": img, "vec": vec, "pe": pe, "transformer_options": transformer_options}, {"original_block": block_wrap})["img"]
            else:
                img = block(img, vec=vec, pe=pe, transformer_options=transformer_options)
        img = img[:, txt.shape[1]:]
        return self.final(img).transpose(1, 2).reshape(b, c, h, wd)


class OldForgeFlux(IntegratedFluxTransformer2DModel):
    """Same class name as Neo's, a forward without block hooks (the June 2025 Forge's Flux)."""

    def forward(self, x, timestep, context, transformer_options={}, **kwargs):
        return super().forward(x, timestep, context, {}, **kwargs)


OldForgeFlux.__name__ = OldForgeFlux.__qualname__ = "IntegratedFluxTransformer2DModel"


class _KModel(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.diffusion_model = model

    def apply_model(self, x, t, c_crossattn=None, transformer_options={}, **kwargs):
        return self.diffusion_model(x, t, context=c_crossattn, transformer_options=transformer_options)


class _Patcher:
    """The part of Forge's UnetPatcher the adapter uses (backend/patcher/base.py)."""

    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = _Patcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_unet_function_wrapper(self, fn):
        self.model_options["model_function_wrapper"] = fn


class _SdModel:
    def __init__(self, patcher):
        self.forge_objects = type("FO", (), {"unet": patcher})()


@pytest.fixture(autouse=True)
def _eager_dynamo(monkeypatch):
    monkeypatch.setenv("SD_ACCEL_DYNAMO_BACKEND", "eager")  # Dynamo without Inductor: same graphs, seconds not minutes
    yield
    w.finish_generation()
    w.clear_caches()


@pytest.fixture
def flux():
    torch.manual_seed(0)
    return IntegratedFluxTransformer2DModel().eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 4, 4, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 3, 8, generator=g)


def _call(m, options=None):
    x, t, ctx = _inputs()
    to = options if options is not None else {"block_index": 7}
    with torch.no_grad():
        return m.model_options["model_function_wrapper"](m.model.apply_model, {"input": x, "timestep": t, "c": {"c_crossattn": ctx, "transformer_options": to}, "cond_or_uncond": [0, 1]})


def _eager(model):
    x, t, ctx = _inputs()
    with torch.no_grad():
        return model(x, t, ctx)


def test_neos_flux_is_the_flux_family(flux):
    assert family_of(flux).name == "flux"


def test_compile_runs_neos_blocks_through_the_regional_compile(flux):
    patcher = _Patcher(_KModel(flux))
    before = copy.deepcopy(patcher.model_options)
    m, applied = w.apply_forge(patcher, w.WebuiOptions(enabled=True, backend="inductor"))
    assert m is not patcher and patcher.model_options == before
    assert isinstance(m.model_options["model_function_wrapper"], DitWrapper)
    to = {"block_index": 7}
    out = _call(m, to)
    assert to == {"block_index": 7}  # the call's transformer_options are copied, never written
    assert torch.allclose(out, _eager(flux), atol=1e-5)
    report = applied.compile_report
    assert "regional: 4 blocks in 2 kinds" in report.target
    assert report.units_compiled == 2 and report.status == "compiled"  # one callable per block kind ran
    assert applied.status() is None and "forward" not in flux.__dict__


def test_a_flux_without_block_hooks_compiles_whole(flux):
    torch.manual_seed(0)
    old = OldForgeFlux().eval()
    m, applied = w.apply_forge(_Patcher(_KModel(old)), w.WebuiOptions(enabled=True, backend="inductor"))
    wrapper = m.model_options["model_function_wrapper"]
    assert type(wrapper) is ForgeWrapper
    assert torch.allclose(_call(m), _eager(old), atol=1e-5)
    assert applied.compile_report.status == "compiled" and "regional" not in applied.compile_report.target


def test_the_step_cache_without_block_hooks_and_the_lcm_lora_are_refused_with_a_note(tmp_path):
    torch.manual_seed(0)
    old = OldForgeFlux().eval()  # the June 2025 Forge's Flux: no block hooks for the Step Cache
    weights = copy.deepcopy(old.state_dict())
    patcher = _Patcher(_KModel(old))
    opts = w.WebuiOptions(enabled=True, deepcache_interval=3, lcm_lora="lcm-sd15")
    m, applied = w.apply_forge(patcher, opts, lora_dirs=str(tmp_path))  # the LCM-LoRA is not even looked up
    assert m is patcher  # nothing left to apply
    status = applied.status()
    assert "Step Cache not applied" in status and "IntegratedFluxTransformer2DModel's forward has none" in status
    assert "Cache interval to 1" in status and "DeepCache" not in status
    assert "LCM-LoRA not applied" in status and "LoRA hot-swap" in status
    assert all(torch.equal(v, weights[k]) for k, v in old.state_dict().items())


def test_the_rest_applies_beside_a_refused_feature(flux):
    m, applied = w.apply_forge(_Patcher(_KModel(flux)), w.WebuiOptions(enabled=True, backend="inductor", lcm_lora="lcm-sd15"))
    assert isinstance(m.model_options["model_function_wrapper"], DitWrapper)
    assert torch.allclose(_call(m), _eager(flux), atol=1e-5)
    assert "LCM-LoRA not applied" in applied.status()


# --- the Step Cache (the cache controls on a DiT model) ---------------------------------------------

SIGMAS = torch.linspace(1.0, 0.0, 7)  # a 6-step run, as Neo's k-diffusion sampler records it (sampling_sigmas)


def _run(m, sigmas=SIGMAS, first=0):
    """One sampler run from step `first`: each call's transformer_options as Neo's calc_cond_uncond_batch makes them."""
    m.model_options["transformer_options"]["sampling_sigmas"] = sigmas  # what Neo's KDiffusionSampler.sample sets
    for s in sigmas[first:-1]:
        _call(m, {**m.model_options["transformer_options"], "cond_or_uncond": [0, 1], "sigmas": s.expand(2)})


def test_the_cache_controls_run_the_step_cache_on_a_dit(flux):
    opts = w.WebuiOptions(enabled=True, deepcache_interval=3)
    m, applied = w.apply_forge(_Patcher(_KModel(flux)), opts)
    wrapper = m.model_options["model_function_wrapper"]
    assert isinstance(wrapper, DitWrapper) and wrapper.steps is not None and applied.status() is None
    assert "Step Cache: mode=forecast interval=3 front=1 back=0 start=0 end=1" in applied.describe()
    _run(m)
    _run(m, SIGMAS.clone())  # the sampler's next run: another sigmas tensor begins another run
    _run(m, torch.linspace(1.0, 0.0, 11), first=4)  # img2img: the run starts part-way through the schedule
    stats = w.finish_generation()
    assert stats["deepcache"] == [] and [s["cached_steps"] for s in stats["stepcache"]] == [[1, 2, 4, 5]] * 3
    assert all(s["calls"] == 6 and s["mode"] == "forecast" and s["block_fraction"] == 1 - 4 * 3 / 24 for s in stats["stepcache"])


def test_another_scripts_block_replacement_still_runs_inside_ours(flux):
    calls = []

    def theirs(i):
        def entry(args, extra):
            calls.append(i)
            return extra["original_block"](args)
        return entry

    patcher = _Patcher(_KModel(flux))
    patcher.model_options["transformer_options"]["patches_replace"] = {"dit": {("double_block", i): theirs(i) for i in (0, 1)}}
    theirs_1 = patcher.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 1)]
    m, _ = w.apply_forge(patcher, w.WebuiOptions(enabled=True, backend="inductor", deepcache_interval=3))
    _run(m)
    assert w.finish_generation()["stepcache"][0]["cached_steps"] == [1, 2, 4, 5]
    # double_block 0 is the front (always runs); double_block 1 is cached: it runs on the two full steps only.
    assert calls.count(0) == 6 and calls.count(1) == 2
    assert patcher.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 1)] is theirs_1


@pytest.mark.parametrize("kw, why", [
    (dict(stepcache_front=3, stepcache_back=1), "must leave at least one of the model's 4 blocks"),
    (dict(stepcache_mode="adaptive", stepcache_front=0), "front_blocks must be >= 1"),
])
def test_step_cache_blocks_that_do_not_fit_get_a_note_and_leave_the_model_untouched(flux, kw, why):
    patcher = _Patcher(_KModel(flux))
    before = copy.deepcopy(patcher.model_options)
    m, applied = w.apply_forge(patcher, w.WebuiOptions(enabled=True, deepcache_interval=3, **kw))
    assert m is patcher and patcher.model_options == before
    assert applied.status().startswith("Step Cache not applied: ") and why in applied.status()


def test_lora_hot_swap_on_a_dit_and_bit_exact_restore(flux, tmp_path):
    g = torch.Generator().manual_seed(3)
    up, down = torch.randn(D, 2, generator=g) * 0.1, torch.randn(2, D, generator=g) * 0.1
    save_file({"lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight": up, "lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight": down,
               "lora_unet_double_blocks_1_img_attn_qkv.alpha": torch.tensor(2.0)}, str(tmp_path / "style.safetensors"))
    weights = copy.deepcopy(flux.state_dict())
    m, applied = w.apply_forge(_Patcher(_KModel(flux)), w.WebuiOptions(enabled=True, backend="inductor", loras=(("style", 0.5),)), lora_dirs=str(tmp_path))
    _call(m)  # LoRAs are fused at the first call, after Neo loaded the model for the pass
    qkv = flux.double_blocks[1].img_attn.qkv.weight
    assert torch.allclose(qkv, weights["double_blocks.1.img_attn.qkv.weight"] + 0.5 * up @ down, atol=1e-6)
    assert torch.equal(flux.double_blocks[0].img_attn.qkv.weight, weights["double_blocks.0.img_attn.qkv.weight"])
    w.finish_generation()
    assert all(torch.equal(v, weights[k]) for k, v in flux.state_dict().items())


def test_lcm_sampler_is_switched_only_for_a_unet(flux):
    assert not w.takes_lcm(_SdModel(_Patcher(_KModel(flux))))
    from tests.unit.test_webui_apply import TinyLDM  # noqa: E402 (the LDM-shaped stand-in)

    assert w.takes_lcm(_SdModel(_Patcher(_KModel(TinyLDM()))))


def test_unknown_model_runs_unchanged_with_a_note():
    patcher = _Patcher(_KModel(nn.Linear(2, 2)))
    m, applied = w.apply_forge(patcher, w.WebuiOptions(enabled=True, backend="inductor"))
    assert m is patcher and "Linear is not a model SD Accel knows" in applied.status() and "Flux / Chroma (DiT)" in applied.status()


def test_a_quantized_dit_is_refused_for_compile_and_loras_and_left_untouched(flux):
    flux.double_blocks[0].txt_mlp.weight = nn.Parameter(flux.double_blocks[0].txt_mlp.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    weights = copy.deepcopy(flux.state_dict())
    patcher = _Patcher(_KModel(flux))
    with pytest.raises(w.SDAccelError) as e:
        w.apply_forge(patcher, w.WebuiOptions(enabled=True, backend="inductor"))
    msg = str(e.value)
    assert "compile needs a Flux / Chroma (DiT) model with fp16, bf16 or fp32 weights" in msg
    assert "float8_e4m3fn, e.g. double_blocks.0.txt_mlp.weight" in msg and "DeepCache" not in msg and "model was not changed" in msg
    assert "model_function_wrapper" not in patcher.model_options
    assert all(torch.equal(v.float(), weights[k].float()) for k, v in flux.state_dict().items())


def test_attention_kernel_applies_to_a_dits_calls_only(flux, monkeypatch):
    seen = []
    block = flux.double_blocks[0]
    orig = type(block).forward

    def spy(self, *a, **k):
        seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return orig(self, *a, **k)

    monkeypatch.setattr(DoubleStreamBlock, "forward", spy)
    m, applied = w.apply_forge(_Patcher(_KModel(flux)), w.WebuiOptions(enabled=True, attention="math"))
    assert isinstance(m.model_options["model_function_wrapper"], DitWrapper) and applied.compile_report is None
    assert torch.allclose(_call(m), _eager(flux), atol=1e-6)
    assert seen[0] == (False, True)  # inside the call: math only
    assert torch.backends.cuda.flash_sdp_enabled()  # and the process's setting is back after it


def test_the_step_cache_steps_aside_for_neos_compile_with_a_note(flux):
    from tests.unit.test_webui_apply import _neo_compile  # noqa: E402 (what Neo's sd_forge_compile script does)

    kmodel = _KModel(flux)
    _neo_compile(kmodel)
    patcher = _Patcher(kmodel)
    m, applied = w.apply_forge(patcher, w.WebuiOptions(enabled=True, deepcache_interval=3))
    assert m is patcher  # nothing left to apply
    assert applied.status().startswith("Step Cache not applied: Forge Neo's Torch Compile Integrated (preset dynamic)")
