import logging

import pytest
import torch
from torch import nn

from sd_accel.accel_core import CompileConfig, SDAccelError, compile
from sd_accel.accel_core import events
from sd_accel.accel_core.backends import resolve

EAGER = dict(backend="inductor", torch_backend="eager")


def run(m, inputs):
    x, t, c = inputs
    with torch.no_grad():
        out = m(x, t, encoder_hidden_states=c)
    return out.sample if hasattr(out, "sample") else out[0]


def test_whole_unet_compiles_and_matches_eager(unet, inputs):
    ref = run(unet, inputs)
    cu = compile(unet, CompileConfig(fullgraph=True, **EAGER))
    out = run(cu, inputs)
    torch.testing.assert_close(out, ref)
    assert cu.report.status == "compiled" and cu.report.whole_error is None


def test_second_call_does_not_recompile(unet, inputs):
    cu = compile(unet, CompileConfig(**EAGER))
    run(cu, inputs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        run(cu, (inputs[0] * 2, inputs[1] - 100, inputs[2] + 1))  # new values, same shapes


def _break_a_block(unet):
    """Make one block unconvertible the ways that break compilers in practice: its forward is
    replaced by a closure with data-dependent control flow and boolean-mask indexing."""
    block = unet.down_blocks[1]
    orig = block.forward

    def patched_forward(hidden_states, temb=None, **kw):
        if hidden_states.mean() > 1e6:  # data-dependent branch: dynamo cannot trace it in one graph
            hidden_states = hidden_states.clone()
            hidden_states[hidden_states > 0] = 0  # boolean-mask indexing
        return orig(hidden_states, temb, **kw)

    block.forward = patched_forward
    return block


def test_real_conversion_failure_falls_back_per_block(unet, inputs, caplog):
    ref = run(unet, inputs)
    _break_a_block(unet)
    seen = []
    listener = lambda ev, data: seen.append(ev)  # noqa: E731
    events.subscribe(listener)
    try:
        cu = compile(unet, CompileConfig(fullgraph=True, **EAGER))
        with caplog.at_level(logging.WARNING, logger="sd_accel"):
            out1 = run(cu, inputs)   # whole conversion fails: eager result returned
            out2 = run(cu, inputs)   # block by block
            out3 = run(cu, inputs)   # steady state
    finally:
        events.unsubscribe(listener)
    for out in (out1, out2, out3):
        torch.testing.assert_close(out, ref)
    rep = cu.report
    assert rep.whole_error and "Unsupported" in rep.whole_error
    assert rep.status == "partial" and rep.units_compiled >= 5
    assert list(rep.fallbacks) == ["down_blocks.1"], rep.fallbacks
    assert "compiled separately" in rep.fallbacks["down_blocks.1"]
    assert "block by block" in caplog.text and "kept eager: down_blocks.1" in caplog.text
    assert "compile_start" in seen and "fallback" in seen


def test_blocks_compiled_one_by_one_run_without_cuda_graphs(unet, inputs, monkeypatch):
    """The whole UNet keeps reduce-overhead's CUDA graphs; its blocks, compiled one by one after the whole
    failed, do not: one block's output is the next one's input (compiling.NO_GRAPHS)."""
    backend = resolve("inductor", "cpu")
    real = type(backend).compile
    modes = []
    monkeypatch.setattr(type(backend), "compile", lambda self, fn, owner, config: modes.append(config.mode) or real(self, fn, owner, config))
    _break_a_block(unet)
    cu = compile(unet, CompileConfig(fullgraph=True, mode="reduce-overhead", **EAGER))
    for _ in range(2):
        run(cu, inputs)
    assert modes[0] == "reduce-overhead" and len(modes) > 1 and set(modes[1:]) == {"default"}


def test_fallback_off_raises_the_conversion_error(unet, inputs):
    _break_a_block(unet)
    cu = compile(unet, CompileConfig(fullgraph=True, fallback=False, **EAGER))
    with pytest.raises(Exception, match="[Dd]ata-dependent|Unsupported"):
        run(cu, inputs)


def test_real_errors_are_not_swallowed(unet):
    cu = compile(unet, CompileConfig(**EAGER))
    with pytest.raises(Exception):
        cu(torch.randn(1, 3, 8, 8), torch.tensor([1]), encoder_hidden_states=torch.randn(1, 7, 16))  # wrong channels
    assert cu.report.status == "pending" and not cu.report.fallbacks


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(torch.nn.functional.silu(self.norm(self.conv(x))))


def test_inductor_compiles_for_real():
    torch.manual_seed(0)
    m = Small().eval()
    x = torch.randn(2, 4, 8, 8)
    cu = compile(m, CompileConfig(backend="inductor"))
    with torch.no_grad():
        torch.testing.assert_close(cu(x), m(x), rtol=1e-4, atol=1e-5)
    assert cu.report.status == "compiled" and cu.report.backend == "inductor"


@pytest.mark.parametrize("kw,word", [({"backend": "tensorrt"}, "backend"), ({"mode": "turbo"}, "mode")])
def test_unknown_options_raise_with_choices(kw, word):
    with pytest.raises(SDAccelError, match=f"unknown {word}.*expected one of"):
        CompileConfig(**kw)


def test_not_a_module_is_refused():
    with pytest.raises(SDAccelError, match="expected a torch nn.Module"):
        compile(lambda x: x, CompileConfig())


@pytest.mark.parametrize("name", ["onediff", "stable-fast"])
def test_missing_backend_falls_back_with_one_line(name, caplog):
    from sd_accel.accel_core import optional

    optional._warned.cache_clear()
    with caplog.at_level(logging.WARNING, logger="sd_accel"):
        b = resolve(name, "cpu")
        resolve(name, "cpu")
    assert b.name == "inductor"
    lines = [r for r in caplog.records if name in r.getMessage()]
    assert len(lines) == 1 and "install" in lines[0].getMessage().lower() or "runs on" in lines[0].getMessage()


def test_auto_is_inductor_on_cpu():
    assert resolve("auto", "cpu").name == "inductor"


@pytest.mark.parametrize("guards, change_seen", [("full", True), ("skip-module", False)])
def test_skip_module_guards_trade_later_module_changes_for_cheaper_calls(guards, change_seen):
    # What the opt-in costs, proven: with dynamo's module guards gone, a submodule replaced after
    # compiling is not noticed (the old graph keeps running); with full guards it recompiles.
    torch._dynamo.reset()
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4)).eval()
    cu = compile(m, CompileConfig(backend="inductor", torch_backend="eager", guards=guards))
    x = torch.randn(2, 4)
    before = cu(x)
    assert torch.allclose(before, m(x))
    m[1] = torch.nn.Tanh()
    after = cu(x)
    assert torch.allclose(after, m(x)) is change_seen
    assert torch.allclose(after, before) is not change_seen
    assert cu.report.status == "compiled"
    torch._dynamo.reset()


class _PriorityAttention(nn.Module):
    """Attention the way ComfyUI calls it on CUDA (comfy/ops.py): inside sdpa_kernel(..., set_priority=True)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = (t[:, None] for t in self.qkv(x).chunk(3, -1))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@pytest.mark.skipif(not hasattr(torch._inductor.config, "unsafe_marked_cacheable_functions"), reason="torch without the allowlist")
def test_sdpa_priority_blocks_do_not_bypass_the_autograd_cache(tmp_path, monkeypatch):
    # Without the allowlist, AOTAutograd refuses to cache graphs holding the sdpa_kernel calls and
    # every new process re-traces the UNet. Two compiles in "two processes" (dynamo reset, same
    # on-disk caches): the second must be an AOTAutograd cache hit, with the same result.
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    m, x = _PriorityAttention().eval(), torch.randn(2, 8, 16)
    outs = []
    counters.clear()
    try:
        for _ in range(2):
            torch._dynamo.reset()
            with torch.no_grad():
                outs.append(compile(m, CompileConfig(backend="inductor"))(x))
        aot = dict(counters["aot_autograd"])
    finally:
        torch._dynamo.reset()
    assert aot.get("autograd_cache_bypass", 0) == 0, aot
    assert aot.get("autograd_cache_hit", 0) == 1, aot
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(outs[0], m(x))


def test_channels_last_stores_conv_weights_nhwc_once_and_keeps_the_parameters(unet, inputs):
    ref = run(unet, inputs)
    params = {n: p for n, p in unet.named_parameters()}
    cu = compile(unet, CompileConfig(channels_last=True, **EAGER))
    out = run(cu, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    convs = [p for p in unet.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(p is params[n] for n, p in unet.named_parameters())  # same Parameters: in-place LoRA updates reach them
    with torch._dynamo.config.patch(error_on_recompile=True):
        run(cu, (inputs[0] * 2, inputs[1], inputs[2]))


def test_channels_last_must_be_a_flag():
    with pytest.raises(SDAccelError, match="channels_last"):
        CompileConfig(channels_last="yes")


def test_graph_breaks_of_the_whole_are_reported(caplog):
    """A break splits the compiled code (attention that reads psutil or the platform per call did, on Forge and Neo):
    the report names it and the log line is a warning, where it once said just "compiled"."""
    class Breaks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    torch._dynamo.reset()
    m = Breaks()
    cu = compile(m, CompileConfig(**EAGER))
    with caplog.at_level(logging.INFO, logger="sd_accel"), torch.no_grad():
        torch.testing.assert_close(cu(torch.ones(2, 8)), m(torch.ones(2, 8)))
    assert cu.report.status == "compiled" and sum(cu.report.graph_breaks.values()) == 1, cu.report
    assert "1 graph break(s)" in cu.report.summary()
    assert any(r.levelno == logging.WARNING and "graph break" in r.getMessage() for r in caplog.records)
    clean = compile(nn.Linear(8, 8), CompileConfig(**EAGER))
    with torch.no_grad():
        clean(torch.ones(2, 8))
    assert clean.report.graph_breaks == {} and "graph break" not in clean.report.summary()
