"""The probes of accel_core.hosts.comfy.native against stand-ins shaped like the newest ComfyUI read.

The stand-ins copy the shape (not the bodies) of Comfy-Org/ComfyUI 0.38.1 as stored by the search
index: comfy/model_prefetch.py (`malloc_graph_enabled(device)`, `prefetch_queue_pop(..., core,
enable_graph, generator, malloc_scope)`), comfy/cli_args.py (`--disable-cuda-graphs`,
`--disable-comfy-compiler`), comfy/ldm/minimax/model.py (MiniMaxH3Model.forward opens the malloc graph,
`_forward` pops the prefetch queue with `malloc_scope="block"`), comfy/ldm/wan/model.py (no prefetch,
no compiler) and comfy/text_encoders/llama.py (a decoder passing `core=` and `enable_graph=`, units
named by `get_dynamic_vram__units`). The real 0.33 tree is probed in tests/integration/test_comfy_native_host.py.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from sd_accel.accel_core.hosts.comfy import native as cn


def _host(monkeypatch, *, compiler: bool, aimdo=True, disable_graphs=False, disable_compiler=False):
    """Fake `comfy`, `comfy.model_prefetch`, `comfy.cli_args` in sys.modules; returns the args object."""
    comfy = types.ModuleType("comfy")
    prefetch = types.ModuleType("comfy.model_prefetch")
    cli = types.ModuleType("comfy.cli_args")
    args = types.SimpleNamespace(disable_cuda_graphs=disable_graphs)
    cli.args = args

    if compiler:
        args.disable_comfy_compiler = disable_compiler

        def malloc_graph_enabled(device):  # 0.38.1's body
            return not args.disable_comfy_compiler and aimdo and getattr(device, "type", None) == "cuda"

        def prefetch_queue_pop(queue, device, module, dtype=None, core=None, enable_graph=False, generator=None, malloc_scope=None):
            pass

        prefetch.malloc_graph_enabled = malloc_graph_enabled
    else:  # 0.33.0's signature
        def prefetch_queue_pop(queue, device, module, dtype=None, core=None, enable_graph=False, generator=None):
            pass
    prefetch.prefetch_queue_pop = prefetch_queue_pop
    comfy.model_prefetch, comfy.cli_args = prefetch, cli
    for name, mod in (("comfy", comfy), ("comfy.model_prefetch", prefetch), ("comfy.cli_args", cli)):
        monkeypatch.setitem(sys.modules, name, mod)
    return args


class MiniMaxH3Like(nn.Module):
    def forward(self, x, transformer_options={}):
        import comfy.model_prefetch
        if comfy.model_prefetch.malloc_graph_enabled(x.device):
            comfy.model_prefetch.malloc_graph_begin(self, x.device)
        return self._forward(x, transformer_options)

    def _forward(self, x, transformer_options={}):
        import comfy.model_prefetch
        for block in []:
            comfy.model_prefetch.prefetch_queue_pop(None, x.device, block, malloc_scope="block")
        return x


class WanLike(nn.Module):
    def forward(self, x, transformer_options={}):
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        return x if not blocks_replace else x


class DecoderLike(nn.Module):
    def forward(self, x):
        import comfy.model_prefetch
        for layer in []:
            def core():
                return layer(x)
            comfy.model_prefetch.prefetch_queue_pop(None, x.device, layer, x.dtype, core=core, enable_graph=True)
        return x


class _Base(nn.Module):
    def __init__(self, dm, units: bool):
        super().__init__()
        self.diffusion_model = dm
        self.units = units

    def get_dynamic_vram__units(self):
        return ([self.diffusion_model], []) if self.units else ([], [])


class Patcher:
    """The parts of a ModelPatcher the probes read."""

    def __init__(self, dm, *, device="cuda", dynamic=True, units=True):
        self.model = _Base(dm, units)
        self.load_device = torch.device(device)
        self._dynamic = dynamic

    def get_model_object(self, name):
        return getattr(self.model, name)

    def is_dynamic(self):
        return self._dynamic


def test_compiler_wired_model_is_seen_and_compile_steps_aside(monkeypatch, caplog):
    _host(monkeypatch, compiler=True)
    state = cn.native_compile_state(Patcher(MiniMaxH3Like(), dynamic=False))
    assert state.comfy_compiler and not state.cuda_graphs  # no `core`/`enable_graph`: blocks are not graphed
    assert "MiniMaxH3Like" in state.note
    with caplog.at_level("INFO", logger="sd_accel"):
        assert cn.step_aside("compile", Patcher(MiniMaxH3Like()), "Compile UNet")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "--disable-comfy-compiler" in lines[0] and "--disable-cuda-graphs" not in lines[0]
    assert cn.decide("deepcache", state).step_aside
    for feature in ("lora", "cast", "lcm"):
        d = cn.decide(feature, state)
        assert not d.step_aside and "runs beside it" in d.note


@pytest.mark.parametrize("kw", [dict(disable_compiler=True), dict(aimdo=False)])
def test_compiler_off_by_flag_or_without_aimdo(monkeypatch, kw):
    args = _host(monkeypatch, compiler=True, **kw)
    before = vars(args).copy()
    state = cn.native_compile_state(Patcher(MiniMaxH3Like()))
    assert state == cn.NativeState()
    assert not cn.decide("compile", state).step_aside
    assert vars(args) == before  # probing never flips a process-wide switch


def test_compiler_needs_cuda(monkeypatch):
    _host(monkeypatch, compiler=True)
    assert not cn.native_compile_state(Patcher(MiniMaxH3Like(), device="cpu")).comfy_compiler


def test_model_that_does_not_opt_in_is_left_to_sd_accel(monkeypatch):
    _host(monkeypatch, compiler=True)
    state = cn.native_compile_state(Patcher(WanLike()))
    assert state == cn.NativeState() and cn.decide("compile", state) == cn.Decision(False, "")


def test_graphs_on_033_shape(monkeypatch):
    args = _host(monkeypatch, compiler=False)
    state = cn.native_compile_state(Patcher(DecoderLike()))
    assert state.cuda_graphs and not state.comfy_compiler
    d = cn.decide("compile", state)
    assert d.step_aside and "--disable-cuda-graphs" in d.note and "--disable-comfy-compiler" not in d.note
    args.disable_cuda_graphs = True
    assert not cn.native_compile_state(Patcher(DecoderLike())).cuda_graphs


@pytest.mark.parametrize("kw", [dict(dynamic=False), dict(device="cpu"), dict(units=False)])
def test_graphs_need_dynamic_vram_cuda_and_named_units(monkeypatch, kw):
    _host(monkeypatch, compiler=False)
    assert not cn.native_compile_state(Patcher(DecoderLike(), **kw)).cuda_graphs


def test_graphs_are_a_compiler_subfeature_when_the_host_has_one(monkeypatch):
    # 0.38.1: prefetch_queue_pop graphs only inside an open malloc graph; a decoder without malloc scopes gets none.
    _host(monkeypatch, compiler=True)
    assert not cn.native_compile_state(Patcher(DecoderLike())).cuda_graphs

    class DecoderWithScopes(DecoderLike):
        def step(self, x):
            import comfy.model_prefetch
            comfy.model_prefetch.prefetch_queue_pop(None, x.device, None, malloc_scope="block")

    state = cn.native_compile_state(Patcher(DecoderWithScopes()))
    assert state.cuda_graphs and state.comfy_compiler
    note = cn.decide("compile", state).note  # one flag: --disable-comfy-compiler stops the graphs too
    assert "--disable-comfy-compiler" in note and "--disable-cuda-graphs" not in note


def test_host_without_model_prefetch(monkeypatch):
    comfy = types.ModuleType("comfy")
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_prefetch", None)  # ImportError, as on 0.8.0 / 0.3.64
    assert cn.native_compile_state(Patcher(MiniMaxH3Like())) == cn.NativeState()


def test_unknown_feature_is_a_clear_error():
    with pytest.raises(ValueError, match="expected one of .* found 'teacache'"):
        cn.decide("teacache", cn.NativeState())


def test_class_words_reads_keywords_and_closures():
    words = cn.class_words(DecoderLike)
    assert {"enable_graph", "core", "prefetch_queue_pop"} <= words
    assert "malloc_scope" in cn.class_words(MiniMaxH3Like) and not cn.class_words(WanLike) & {"malloc_scope", "enable_graph"}
