"""Compile UNet rides ComfyUI's public model API only (docs/comfy-internals.md): nothing is set on the
shared UNet or on the patcher beyond a keyed DIFFUSION_MODEL wrapper, plain and compiled clones of one
model alternate, and a LoRA loaded after Compile needs no in-place weight updates to run recompile-free.

A tiny SD1.x-family UNet; dynamo's "eager" backend (the same tracing, guards and recompiles as inductor).
"""
from __future__ import annotations

import pytest
import torch

import comfy_harness as harness

DIFFUSION_MODEL = "diffusion_model"  # comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL on every host


def _tiny(requires_grad=False):
    # ComfyUI builds and loads every model inside torch.inference_mode (execution.py), so its
    # parameters, and those LoraLoader's patches put in their place, are inference tensors alike.
    # ComfyUI 0.33's BaseModel turns requires_grad off (as the patched ones are); 0.3.64 / 0.8.0 leave it on.
    with torch.inference_mode():
        m = harness.tiny_unet_model(seed=5)
        m.model.diffusion_model.requires_grad_(requires_grad)
    return m


@pytest.fixture(scope="module")
def tiny(comfy_host):
    return _tiny()


@pytest.fixture
def compiled(comfy_adapter, accel, tiny):
    torch._dynamo.reset()
    yield comfy_adapter.apply_compile(tiny, accel.compile.CompileConfig(torch_backend="eager"))
    torch._dynamo.reset()


def _kohya_lora(tiny, tmp_path, seed):
    import comfy.utils

    path = harness.write_kohya_lora(tmp_path / f"l{seed}.safetensors", harness.lora_targets(tiny), seed=seed)
    return comfy.utils.load_torch_file(str(path), safe_load=True)


def _with_lora(model, sd, strength):
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, sd, strength, 0)[0]  # what LoraLoaderModelOnly does


class _Probe:
    """A forward hook on a UNet block: runs in eager code on every call, but only while dynamo traces
    in compiled code (the graph replays without it)."""

    def __init__(self, unet):
        self.eager_calls = 0
        self.handle = unet.out.register_forward_hook(self)

    def __call__(self, module, args, out):
        if not torch.compiler.is_compiling():
            self.eager_calls += 1


def test_only_a_keyed_wrapper_is_added(comfy_host, comfy_adapter, tiny, compiled):
    assert compiled.wrappers[DIFFUSION_MODEL][comfy_adapter.COMPILE_KEY]
    assert comfy_adapter.COMPILE_KEY not in compiled.wrappers.get("apply_model", {})
    # ComfyUI's default stays where its patched parameters match the model's (see the last test).
    assert compiled.weight_inplace_update is False and tiny.weight_inplace_update is False
    assert compiled.object_patches == tiny.object_patches == {}


def test_other_wrappers_run_eager_around_the_compiled_body_and_the_unet_is_never_changed(comfy_host, comfy_adapter, tiny, compiled):
    import comfy.patcher_extension as pe

    unet = tiny.model.diffusion_model
    artifacts = comfy_host.pack_module("accel_core.registry").ATTR  # the compiled artifacts' holder, set once (docs/comfy-internals.md)
    before = {k: v for k, v in unet.__dict__.items() if k != artifacts}
    seen = []

    def other_pack(executor, *args, **kwargs):  # installed before and after Compile UNet's
        seen.append((torch.compiler.is_compiling(), "_forward" in executor.class_obj.__dict__, "forward" in unet.__dict__))
        return executor(*args, **kwargs)

    outer = tiny.clone()
    outer.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test.outer", other_pack)
    m = comfy_adapter.apply_compile(outer, comfy_adapter.active_compile_config({"wrappers": compiled.wrappers}))
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test.inner", other_pack)
    names = [k for k in m.wrappers[DIFFUSION_MODEL]]
    assert names == ["test.outer", comfy_adapter.COMPILE_KEY, "test.inner"]
    ref = harness.sample(tiny)
    harness.sample(m)  # compiles
    probe = _Probe(unet)
    try:
        out = harness.sample(m)
    finally:
        probe.handle.remove()
    assert probe.eager_calls == 0, "the UNet body ran eager: the compiled code was not used"
    assert harness.rel_err(out, ref) < 1e-4
    assert seen and not any(c for c, _, _ in seen), "a wrapper around Compile UNet ran inside compiled code"
    assert not any(f or g for _, f, g in seen), "the shared UNet's _forward/forward was replaced during a call"
    after = {k: v for k, v in unet.__dict__.items() if k != artifacts}
    assert after.keys() == before.keys() and all(after[k] is v for k, v in before.items())
    assert comfy_adapter.compile_report(m)["status"] == "compiled"


def test_plain_and_compiled_clones_of_one_model_alternate(tiny, compiled):
    unet = tiny.model.diffusion_model
    ref = harness.sample(tiny)
    harness.sample(compiled)  # compiles
    probe = _Probe(unet)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for model, compiled_run in ((tiny, False), (compiled, True), (tiny.clone(), False), (compiled.clone(), True), (tiny, False)):
                probe.eager_calls = 0
                assert harness.rel_err(harness.sample(model), ref) < 1e-4
                assert (probe.eager_calls == 0) is compiled_run, (model, probe.eager_calls)
    finally:
        probe.handle.remove()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_lora_loaded_after_compile_swaps_without_recompiling(comfy_adapter, accel, tiny, tmp_path, channels_last):
    torch._dynamo.reset()
    compiled = comfy_adapter.apply_compile(tiny, accel.compile.CompileConfig(torch_backend="eager", channels_last=channels_last))
    _lora_swaps_reuse_the_graph(compiled, tiny, _tiny(), tmp_path, in_place=False)
    torch._dynamo.reset()


def test_parameters_that_require_grad_get_in_place_patches(comfy_adapter, accel, tmp_path):
    """The one write: where the model's parameters require grad (ComfyUI 0.3.64 / 0.8.0), ComfyUI's patched
    Parameters (requires_grad=False) would fail dynamo's guard. Compile's clone then copies patches
    in place; without that, the first LoRA compiles again."""
    from torch._dynamo.utils import counters

    model = _tiny(requires_grad=True)
    torch._dynamo.reset()
    compiled = comfy_adapter.apply_compile(model, accel.compile.CompileConfig(torch_backend="eager"))
    assert compiled.weight_inplace_update is True and model.weight_inplace_update is False
    _lora_swaps_reuse_the_graph(compiled, model, _tiny(requires_grad=True), tmp_path, in_place=True)
    # The proof that it is needed: the same LoRA on a clone that replaces Parameters compiles again.
    replacing = compiled.clone()
    replacing.weight_inplace_update = False  # test only: the default ComfyUI would use
    graphs = counters["stats"]["unique_graphs"]
    harness.sample(_with_lora(replacing, _kohya_lora(model, tmp_path, 3), 1.0))
    assert counters["stats"]["unique_graphs"] > graphs
    torch._dynamo.reset()


def _lora_swaps_reuse_the_graph(compiled, tiny, twin, tmp_path, in_place):
    """LoRAs through ComfyUI's own path on `compiled` (a clone of `tiny`) reuse its graph, and `tiny`
    gets its weights back. Without weight_inplace_update ComfyUI puts new Parameters in the patched
    places; compiled code reads parameters as inputs (dynamo guards their dtype, shape, strides,
    requires_grad and dispatch keys, not their identity). channels_last: the conv weights Compile
    stores NHWC (on a DynamicVRAM model's regular copy) keep their layout through patch and restore.
    References come from `twin` (same weights, another UNet), so no sibling patches `tiny`."""
    from torch._dynamo.utils import counters

    lora_a, lora_b = _kohya_lora(tiny, tmp_path, 1), _kohya_lora(tiny, tmp_path, 2)
    unet = tiny.model.diffusion_model
    base = harness.sample(tiny)
    harness.sample(compiled)  # compiles
    graphs = counters["stats"]["unique_graphs"]
    replaced = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for sd, strength in ((lora_a, 1.0), (lora_b, 0.5), (lora_a, -1.0), (None, 0.0), (lora_b, 1.0)):
            want = base if sd is None else harness.sample(_with_lora(twin, sd, strength))
            assert harness.rel_err(harness.sample(tiny), base) < 1e-4, "LoRA weights stuck on the plain model"
            ids = {k: id(p) for k, p in unet.named_parameters()}
            model = compiled.clone() if sd is None else _with_lora(compiled, sd, strength)
            assert harness.rel_err(harness.sample(model), want) < 1e-4, strength
            replaced |= {k for k, p in unet.named_parameters() if id(p) != ids[k]}
    assert counters["stats"]["unique_graphs"] == graphs
    assert bool(replaced) is not in_place, "weight_inplace_update is not what the model needs"
