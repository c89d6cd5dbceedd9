"""The webui adapter's apply/undo bookkeeping, on a tiny LDM-shaped UNet (no webui needed).

The real webui UNets (A1111's ldm/sgm UNetModel, Forge's IntegratedUNet2DConditionModel) are
exercised in tests/integration/test_webui_*.py; here the structure only has to be the LDM one.
"""
import copy
import gc
import logging
import weakref

import pytest
import torch
from torch import nn

from sd_accel.accel_core import registry
from sd_accel.accel_core.compile import CompileReport
from sd_accel.accel_core.deepcache import DeepCacheConfig, full_steps
from sd_accel.accel_core.hosts import webui as w
from sd_accel.accel_core.hosts.webui import deepcache as webui_deepcache, forge_wrapper
from sd_accel.accel_core.hosts.webui.runner import Runner


class _Seq(nn.Sequential):
    def forward(self, h, emb, context=None):
        for layer in self:
            h = layer(h)
            h = h + emb[:, : h.shape[1], None, None]
        return h


class TinyLDM(nn.Module):
    """input_blocks / middle_block / output_blocks / out / time_embed, skips concatenated as in LDM."""

    def __init__(self, ch=8):
        super().__init__()
        self.model_channels, self.num_classes, self.dtype = ch, None, torch.float32
        self.time_embed = nn.Sequential(nn.Linear(1, 2 * ch), nn.SiLU())
        self.input_blocks = nn.ModuleList([_Seq(nn.Conv2d(4, ch, 3, padding=1)), _Seq(nn.Conv2d(ch, ch, 3, padding=1))])
        self.middle_block = _Seq(nn.Conv2d(ch, ch, 3, padding=1))
        self.output_blocks = nn.ModuleList([_Seq(nn.Conv2d(2 * ch, ch, 3, padding=1)), _Seq(nn.Conv2d(2 * ch, ch, 3, padding=1))])
        self.out = nn.Sequential(nn.GroupNorm(2, ch), nn.Conv2d(ch, 4, 3, padding=1))

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        emb = self.time_embed(timesteps.float()[:, None] / 1000)
        hs, h = [], x
        for m in self.input_blocks:
            h = m(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for m in self.output_blocks:
            h = m(torch.cat([h, hs.pop()], 1), emb, context)
        return self.out(h)


class _Holder:
    pass


def _sd_model(unet):
    sd = _Holder()
    sd.model = _Holder()
    sd.model.diffusion_model = unet
    return sd


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyLDM().eval()


@pytest.fixture
def xs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 500]), torch.randn(2, 3, 16, generator=g)


@pytest.fixture(autouse=True)
def _eager_dynamo(monkeypatch):
    monkeypatch.setenv("SD_ACCEL_DYNAMO_BACKEND", "eager")  # Dynamo without Inductor: same graphs, seconds not minutes
    yield
    w.finish_generation()
    w.clear_caches()


def test_compile_swaps_forward_for_the_generation_and_undo_restores(tiny, xs):
    with torch.no_grad():
        ref = tiny(*xs)
        applied = w.A1111.apply(_sd_model(tiny), w.WebuiOptions(enabled=True, backend="inductor"))
        assert isinstance(tiny.__dict__.get("forward"), Runner)
        out = tiny(*xs)
        assert torch.allclose(out, ref, atol=1e-6)
        assert applied.compile_report is not None and applied.compile_report.status == "compiled"
        assert applied.status() is None
        assert w.A1111.undo() is True
        assert "forward" not in tiny.__dict__
        assert torch.equal(tiny(*xs), ref)
        assert w.A1111.undo() is False  # idempotent


def test_apply_is_idempotent_per_options_and_reuses_compiled(tiny):
    sd = _sd_model(tiny)
    opts = w.WebuiOptions(enabled=True, backend="inductor")
    w.A1111.apply(sd, opts)
    runner = tiny.forward
    w.A1111.apply(sd, opts)  # process_batch then process_before_every_sampling
    assert tiny.forward is runner
    compiled = w.A1111.compiled
    w.A1111.apply(sd, w.WebuiOptions(enabled=True, backend="inductor", attention="math"))
    assert tiny.forward is not runner
    assert w.A1111.compiled is compiled  # same UNet, same CompileConfig: the compiled callable is kept
    w.A1111.undo()
    w.A1111.apply(sd, opts)
    assert w.A1111.compiled is compiled


def test_switched_off_leaves_the_webui_path(tiny):
    sd = _sd_model(tiny)
    w.A1111.apply(sd, w.WebuiOptions(enabled=True, backend="inductor"))
    assert w.A1111.apply(sd, w.WebuiOptions(enabled=False, backend="inductor")) is None
    assert "forward" not in tiny.__dict__
    assert w.last_applied() is None


def test_another_extensions_forward_is_left_alone(tiny, xs):
    theirs = lambda *a, **k: "controlnet"  # noqa: E731
    tiny.forward = theirs
    applied = w.A1111.apply(_sd_model(tiny), w.WebuiOptions(enabled=True, backend="inductor"))
    assert tiny.__dict__["forward"] is theirs
    assert "another extension" in applied.status()


def test_undo_does_not_remove_a_forward_installed_after_ours(tiny, caplog):
    w.A1111.apply(_sd_model(tiny), w.WebuiOptions(enabled=True, backend="inductor"))
    later = lambda *a, **k: None  # noqa: E731
    tiny.forward = later
    with caplog.at_level(logging.WARNING, logger="sd_accel"):
        assert w.A1111.undo() is False
    assert tiny.__dict__["forward"] is later
    assert "replaced by something else" in caplog.text


def test_non_unet_model_is_not_touched():
    sd = _sd_model(nn.Linear(2, 2))
    applied = w.A1111.apply(sd, w.WebuiOptions(enabled=True, backend="inductor"))
    assert "not an SD1.x" in applied.status()
    assert "forward" not in sd.model.diffusion_model.__dict__


def test_cast_copy_leaves_the_original_and_follows_weight_changes(tiny, xs):
    sd = _sd_model(tiny)
    p0 = next(tiny.parameters())
    ptr, dtype = p0.data_ptr(), p0.dtype
    with torch.no_grad():
        ref = tiny(*xs)
        w.A1111.apply(sd, w.WebuiOptions(enabled=True, dtype="bf16", channels_last=True))
        out = tiny(*xs)
        assert out.dtype == ref.dtype  # the webui gets its own dtype back
        err = float((out - ref).norm() / ref.norm())
        assert 0 < err < 0.05  # bf16 arithmetic: close, not identical
        copy1 = w.cast_copy_for(tiny, w.WebuiOptions(enabled=True, dtype="bf16", channels_last=True).cast_config())
        assert next(copy1.parameters()).dtype == torch.bfloat16
        assert copy1.out[0].weight.dtype == torch.float32  # norms stay fp32 (GroupNorm32 on CPU)
        assert (p0.data_ptr(), p0.dtype) == (ptr, dtype)
        w.A1111.undo()
        w.A1111.apply(sd, w.WebuiOptions(enabled=True, dtype="bf16", channels_last=True))
        assert w.cast_copy_for(tiny, w.WebuiOptions(enabled=True, dtype="bf16", channels_last=True).cast_config()) is copy1
        w.A1111.undo()
        p0.add_(1.0)  # the webui loaded other weights into the same module (or patched them)
        copy2 = w.cast_copy_for(tiny, w.WebuiOptions(enabled=True, dtype="bf16", channels_last=True).cast_config())
        assert copy2 is not copy1
        assert torch.allclose(next(copy2.parameters()).float(), p0.float(), atol=0.02)


def test_artifacts_die_with_the_checkpoint(xs):
    """No stale compiled UNet after a checkpoint change: the old UNet and its graphs are freed."""
    unet = TinyLDM().eval()
    sd = _sd_model(unet)
    with torch.no_grad():
        w.A1111.apply(sd, w.WebuiOptions(enabled=True, backend="inductor", dtype="bf16"))
        unet(*xs)
    w.A1111.undo()
    assert len(w.cache_state()) == 2  # the UNet and its cast copy, each with a compiled callable or a copy
    ref = weakref.ref(unet)
    del unet, sd
    torch._dynamo.reset()  # dynamo's code cache refers to the compiled frames, as a checkpoint change would
    gc.collect()
    assert ref() is None
    assert w.cache_state() == []


def test_artifacts_are_not_copied_with_the_unet(tiny):
    w.compiled_for(tiny, w.WebuiOptions(enabled=True, backend="inductor").compile_config())
    dup = copy.deepcopy(tiny)
    assert not registry.compiled_of(dup)


def test_clear_caches(tiny):
    w.compiled_for(tiny, w.WebuiOptions(enabled=True, backend="inductor").compile_config())
    assert w.clear_caches() == 1
    assert w.cache_state() == []


def test_status_reports_compile_fallback():
    applied = w.Applied("A1111", w.WebuiOptions(enabled=True, backend="inductor"))

    applied.compile_report = CompileReport("inductor", "inductor", "default", "UNet", status="partial", fallbacks={"input_blocks.1": "x"})
    assert applied.status() == "compile partial: 1 block(s) eager"
    assert "inductor" in applied.describe()


# --- DeepCache scheduling (the host walks are tested on the real UNets in integration) -----------------

def test_deepcache_follows_the_denoiser_step_and_restarts_per_pass(tiny, xs):
    calls = []

    def full(x, *a, **k):
        calls.append("full")
        return x + 1, x * 2

    def shallow(cached, x, *a, **k):
        calls.append("shallow")
        assert torch.equal(cached, x * 2)
        return x + 1

    pos = {"v": None}
    cfg = DeepCacheConfig(cache_interval=3, cache_depth=0)
    run = webui_deepcache.DeepCacheRun(tiny, cfg, None, lambda: pos["v"], paths=(full, shallow))
    x = xs[0]
    run(x)  # no sampler progress known: plain full forward
    assert calls == ["full"]
    calls.clear()
    for total in (9, 6):  # first pass, then a hires-fix pass with its own denoiser
        for step in range(total):
            pos["v"] = (step, total)
            run(x)
            run(x)  # cond and uncond as separate calls (batch_cond_uncond off)
        expected = ["full" if f else "shallow" for f in full_steps(total, cfg) for _ in range(2)]
        assert calls == expected
        calls.clear()
    run.finish()
    assert [r["hits"] for r in run.runs] == [sum(not f for f in full_steps(9, cfg)), sum(not f for f in full_steps(6, cfg))]


# --- Forge ------------------------------------------------------------------------------------------

class _KModel(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet

    def apply_model(self, x, t, c_crossattn=None, **kwargs):
        return self.diffusion_model(x, t, context=c_crossattn)


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


def test_forge_clone_routes_through_the_compiled_unet_for_the_call(tiny, xs):
    seen = []

    def theirs(apply_model, args):
        seen.append(isinstance(apply_model.__self__.diffusion_model.__dict__.get("forward"), Runner))
        return apply_model(args["input"], args["timestep"], **args["c"])

    patcher = _Patcher(_KModel(tiny))
    patcher.set_model_unet_function_wrapper(theirs)
    before = dict(patcher.model_options)
    m, applied = w.apply_forge(patcher, w.WebuiOptions(enabled=True, backend="inductor"))
    assert m is not patcher and patcher.model_options == before
    x, t, ctx = xs
    with torch.no_grad():
        ref = tiny(x, t, ctx)
        wrapper = m.model_options["model_function_wrapper"]
        out = wrapper(m.model.apply_model, {"input": x, "timestep": t, "c": {"c_crossattn": ctx}, "cond_or_uncond": [0, 1]})
    assert seen == [True]  # the previous wrapper ran, inside ours
    assert torch.allclose(out, ref, atol=1e-6)
    assert "forward" not in tiny.__dict__
    assert applied.compile_report.status == "compiled"
    assert copy.deepcopy(m.model_options)["model_function_wrapper"] is wrapper  # Forge deep-copies on clone


def test_forge_cast_is_declined_with_a_note(tiny):
    m, applied = w.apply_forge(_Patcher(_KModel(tiny)), w.WebuiOptions(enabled=True, dtype="fp16"))
    assert "Diffusion in Low Bits" in applied.status()
    assert next(tiny.parameters()).dtype == torch.float32


def test_forge_non_unet_passes_through():
    patcher = _Patcher(_KModel(nn.Linear(2, 2)))
    m, applied = w.apply_forge(patcher, w.WebuiOptions(enabled=True, backend="inductor"))
    assert m is patcher and "Flux and SD3 run unchanged" in applied.status()


def test_forge_off_is_the_input():
    patcher = _Patcher(_KModel(TinyLDM()))
    m, applied = w.apply_forge(patcher, w.WebuiOptions())
    assert m is patcher and applied is None


# --- Forge Neo: its Torch Compile Integrated wraps apply_model; quantized UNets ----------------------

def _neo_compile(kmodel, preset="dynamic", with_wraps=True):
    """What Neo's sd_forge_compile script does in process_batch: a plain function as the KModel's apply_model."""
    import functools

    orig = kmodel.apply_model

    def apply_model_with_compile(*args, **kwargs):
        return orig(*args, **kwargs)

    kmodel.apply_model = functools.wraps(orig)(apply_model_with_compile) if with_wraps else apply_model_with_compile
    kmodel._torch_compile_config = (preset,)
    return kmodel.apply_model


def _call(m, xs):
    x, t, ctx = xs
    wrapper = m.model_options["model_function_wrapper"]
    with torch.no_grad():
        return wrapper(m.model.apply_model, {"input": x, "timestep": t, "c": {"c_crossattn": ctx}, "cond_or_uncond": [0, 1]})


def test_forge_wrapper_takes_a_plain_function_as_apply_model(tiny, xs):
    # A script that wraps apply_model after SD Accel's wrapper is installed (no __self__, no __wrapped__):
    # the wrapper finds the UNet through the patcher's model and never raises.
    kmodel = _KModel(tiny)
    m, applied = w.apply_forge(_Patcher(kmodel), w.WebuiOptions(enabled=True, backend="inductor"))
    _neo_compile(kmodel, with_wraps=False)
    with torch.no_grad():
        ref = tiny(*xs)
    out = _call(m, xs)
    assert torch.allclose(out, ref, atol=1e-6)
    assert "forward" not in tiny.__dict__


def test_forge_steps_aside_for_neos_compile_with_a_note(tiny, xs):
    kmodel = _KModel(tiny)
    _neo_compile(kmodel, preset="max-autotune")
    patcher = _Patcher(kmodel)
    assert forge_wrapper.host_compile(kmodel) == "Forge Neo's Torch Compile Integrated (preset max-autotune)"
    m, applied = w.apply_forge(patcher, w.WebuiOptions(enabled=True, backend="inductor", deepcache_interval=3, attention="math"))
    assert m is patcher  # nothing of SD Accel's left to apply: Forge's own patcher, untouched
    status = applied.status()
    assert "compile and DeepCache and attention kernel not applied" in status and "preset max-autotune" in status and "Disable" in status
    assert registry.compiled_of(tiny) == {}
    assert "forward" not in tiny.__dict__
    assert forge_wrapper.host_compile(_KModel(tiny)) is None
    kmodel.apply_model = kmodel.__dict__.pop("apply_model").__wrapped__  # Neo's compile set to Disable: its own bound method back
    del kmodel._torch_compile_config
    assert "apply_model" in vars(kmodel) and forge_wrapper.host_compile(kmodel) is None


def test_forge_wrapper_under_neos_compile_calls_through(tiny, xs):
    # With only LoRAs left, the wrapper runs apply_model as Forge would (a wrapped one too) and never swaps the forward.
    kmodel = _KModel(tiny)
    _neo_compile(kmodel)
    wrapper = forge_wrapper.ForgeWrapper(w.Plan(), kmodel=kmodel, specs=None, swap=False)
    with torch.no_grad():
        ref = tiny(*xs)
        x, t, ctx = xs
        out = wrapper(kmodel.apply_model, {"input": x, "timestep": t, "c": {"c_crossattn": ctx}, "cond_or_uncond": [0, 1]})
    assert torch.equal(out, ref) and "forward" not in tiny.__dict__


class _GGUFParam(nn.Parameter):
    """Stands for Forge's ParameterGGUF (backend/operations_gguf.py): packed uint8 data, the quant type on the parameter."""

    class Q4_K:  # noqa: N801 (gguf's own class name)
        pass

    def __new__(cls, data):
        p = super().__new__(cls, data, requires_grad=False)
        p.gguf_cls = cls.Q4_K
        return p


@pytest.mark.parametrize("quantize, found", [
    (lambda conv: setattr(conv, "weight", nn.Parameter(conv.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)), "float8_e4m3fn"),
    (lambda conv: setattr(conv, "weight", nn.Parameter(torch.zeros(conv.weight.shape, dtype=torch.int8), requires_grad=False)), "int8"),
    (lambda conv: setattr(conv, "weight", _GGUFParam(torch.zeros(64, dtype=torch.uint8))), "GGUF Q4_K"),
])
def test_quantized_unet_is_refused_for_compile_and_loras_untouched(tiny, quantize, found):
    quantize(tiny.input_blocks[1][0])
    patcher = _Patcher(_KModel(tiny))
    before = dict(patcher.model_options)
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    for opts in (w.WebuiOptions(enabled=True, backend="inductor"), w.WebuiOptions(enabled=True, loras=(("style", 1.0),))):
        with pytest.raises(w.SDAccelError) as e:
            w.apply_forge(patcher, opts)
        msg = str(e.value)
        assert found in msg and "input_blocks.1.0.weight" in msg  # what was found
        assert "fp16, bf16 or fp32" in msg and "Diffusion in Low Bits" in msg and "not changed" in msg  # expected, what to do
        assert patcher.model_options == before and not w.SESSION.forge_passes
        assert registry.compiled_of(tiny) == {}
    assert all(torch.equal(v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v, state[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else state[k])
               for k, v in tiny.state_dict().items())
    with pytest.raises(w.SDAccelError, match="FP8 weight"):
        w.A1111.apply(_sd_model(tiny), w.WebuiOptions(enabled=True, backend="inductor"))
    assert "forward" not in tiny.__dict__


def test_plain_unets_are_not_quantized(tiny):
    from sd_accel.accel_core.hosts.webui.quant import quantized_storage

    assert quantized_storage(tiny) is None
    assert quantized_storage(tiny.to(torch.bfloat16)) is None
