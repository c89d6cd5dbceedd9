"""DeepCache through a real ComfyUI (COMFYUI_PATH): the node, KSampler runs, Compile UNet stacking, ControlNet.

Most tests use a small UNetModel of SD1.5's block layout (width 32) built with ComfyUI's own
classes, so nine-step runs take seconds; `test_real_checkpoint_cases` goes through ComfyUI's
checkpoint loader with the full-size SD1.5 architecture (the shared `sd15_model` fixture).
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import comfy_harness as harness

STEPS = 9
SIZE = 16


class Pack:
    """The pack's modules as ComfyUI loaded them (their classes and registries are the ones the nodes use)."""

    def __init__(self, host):
        self.host = host
        self.dc = host.pack_module("accel_core.hosts.comfy.deepcache")
        self.core = host.pack_module("accel_core.deepcaching")
        self.ldm = host.pack_module("accel_core.families.ldm")
        self.registry = host.pack_module("accel_core.registry")
        self.comfy = host.pack_module("accel_core.hosts.comfy")
        self.compile = host.pack_module("accel_core.compiling")
        self.events = host.pack_module("accel_core.events")
        self.errors = host.pack_module("accel_core.errors")

    def deepcache(self, model, interval=3, depth=0, start=0.0, end=1.0, schedule="uniform"):
        return self.host.node("SDAccelDeepCache").apply(model, interval, depth, start, end, schedule)[0]

    def full_steps(self, n, **kw):
        return self.core.full_steps(n, self.core.DeepCacheConfig(**kw))


@pytest.fixture(scope="module")
def pack(comfy_host):
    return Pack(comfy_host)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small UNets gain little from threads, and on a busy 2-core machine two threads thrash.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def stats(pack):
    seen = []

    def listen(event, data):
        if event == "deepcache_stats":
            seen.append(data)

    pack.events.subscribe(listen)
    yield seen
    pack.events.unsubscribe(listen)


def tiny_model(unet_config=None, seed=0):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cfg = unet_config or dict(harness.SD15_UNET_CONFIG, model_channels=32, num_heads=2)
    mc = comfy.supported_models.SD15(dict(cfg))
    mc.set_inference_dtype(torch.float32, None)
    bm = mc.get_model({}, "", device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in bm.diffusion_model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return comfy.model_patcher.ModelPatcher(bm, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


@pytest.fixture(scope="module")
def tiny(comfy_host):
    return tiny_model()


def run(model, case=harness.TXT2IMG, sampler="euler", positive=None, steps=STEPS):
    import nodes

    pos, neg = harness.conditioning()
    with torch.inference_mode():
        out = nodes.common_ksampler(model, 42, steps, 4.0, sampler, "normal", positive or pos, neg, case.latent(SIZE), denoise=case.denoise)
    return out[0]["samples"].clone()


@pytest.fixture(scope="module")
def baseline(tiny):
    cache = {}

    def get(case=harness.TXT2IMG, sampler="euler"):
        if (case, sampler) not in cache:
            cache[(case, sampler)] = run(tiny, case, sampler)
        return cache[(case, sampler)]

    return get


# --- the two paths against UNetModel._forward -------------------------------------------------

def _control(unet, x, t, ctx, seed=11):
    """ControlNet-shaped residuals (input/middle/output lists, popped from the end) for every block."""
    shapes = []
    patch = {"patches": {"input_block_patch": [lambda h, to: (shapes.append(h.shape), h)[1]]}}
    with torch.no_grad():
        unet._forward(x, t, ctx, None, None, patch)
    g = torch.Generator().manual_seed(seed)
    r = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    mid = torch.randn(shapes[-1], generator=g) * 0.1
    return {"input": list(reversed(r)), "middle": [mid], "output": list(r)}


def _copy(control):
    return {k: list(v) for k, v in control.items()}


def _host_calls(patch_name: str) -> bool:
    """Whether this ComfyUI's own UNetModel._forward calls a block patch (middle_block_after_patch: 0.33)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return patch_name in inspect.getsource(UNetModel._forward)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, SIZE, SIZE, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768, generator=g)


def _check_paths(pack, unet, x, t, ctx, control, options, ref):
    """The plain walk is `ref`; at every depth the full path is too, and the shallow path from its kept feature."""
    hooks = pack.dc.COMFY
    with torch.no_grad():
        assert torch.equal(pack.ldm.forward(unet, hooks, x, t, ctx, None, _copy(control), options()), ref)
        for d in range(len(unet.input_blocks)):
            full, shallow = pack.ldm.paths(unet, hooks, d)
            out, kept = full(x, t, ctx, None, _copy(control), options())
            assert torch.equal(out, ref), d
            keep = kept.clone()
            for _ in range(2):  # twice: the kept feature survives in-place patches
                to = options()
                assert torch.equal(shallow(kept, x, t, ctx, None, _copy(control), to), ref), d
            assert torch.equal(kept, keep)
            assert to["transformer_index"] == 16  # as after the full walk: SD1.5 has 16 spatial transformers


def test_paths_replay_forward_with_control_and_patches(pack, tiny):
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample

    unet = tiny.model.diffusion_model
    x, t, ctx = _inputs()
    control = _control(unet, x, t, ctx)
    seen = []

    def freeu_like(h, hsp, to):  # scales h in place, as FreeU does
        h[:, : h.shape[1] // 2] *= 1.1
        return h, hsp

    def downsample_patch(layer, x, emb, *rest):  # forward_timestep_embed_patch: replaces how a layer type is called
        seen.append(1)
        return layer(x) * 0.99

    def options():
        return {"patches": {"output_block_patch": [freeu_like], "emb_patch": [lambda e, mc, to: e * 1.01],
                            "forward_timestep_embed_patch": [(Downsample, downsample_patch)]},
                "patches_replace": {}}

    with torch.no_grad():
        ref = unet._forward(x, t, ctx, None, _copy(control), options())
    assert seen
    _check_paths(pack, unet, x, t, ctx, control, options, ref)


def test_middle_block_after_patch_is_honoured(pack, tiny):
    if not _host_calls("middle_block_after_patch"):
        pytest.skip("this ComfyUI's UNetModel._forward has no middle_block_after_patch (ComfyUI 0.33 has)")
    unet = tiny.model.diffusion_model
    x, t, ctx = _inputs()
    control = _control(unet, x, t, ctx)
    keys = []

    def after_middle(args):
        keys.append(sorted(args))
        return {**args, "h": args["h"] * 0.5 + 0.1}

    def options():
        return {"patches": {"middle_block_after_patch": [after_middle]}}

    with torch.no_grad():
        ref = unet._forward(x, t, ctx, None, _copy(control), options())
        assert not torch.equal(ref, unet._forward(x, t, ctx, None, _copy(control), {}))  # the patch changes the result
    keys.clear()
    _check_paths(pack, unet, x, t, ctx, control, options, ref)
    assert keys and keys[0] == ["context", "emb", "h", "timesteps", "transformer_options", "x", "y"]


def test_output_patch_that_merges_the_skip_itself(pack, tiny):
    """An output_block_patch returning hsp=None (SUPIR) has concatenated the skip itself: no second cat."""
    unet = tiny.model.diffusion_model
    x, t, ctx = _inputs()
    control = _control(unet, x, t, ctx)

    def merge(h, hsp, to):
        return torch.cat([h, hsp], dim=1), None

    with torch.no_grad():
        ref = unet._forward(x, t, ctx, None, _copy(control), {})  # what the merge amounts to, on every host
    _check_paths(pack, unet, x, t, ctx, control, lambda: {"patches": {"output_block_patch": [merge]}}, ref)


# --- sampling through KSampler ------------------------------------------------------------------

def test_interval_one_and_all_full_runs_are_the_baseline(pack, tiny, baseline, stats):
    import comfy.patcher_extension as pe

    off = pack.deepcache(tiny, interval=1)
    assert pack.dc.DEEPCACHE_KEY not in off.wrappers.get(pe.WrappersMP.DIFFUSION_MODEL, {})
    assert torch.equal(run(off), baseline())
    # Caching only after 95% of 9 steps: none is shallow, so every step is our full path.
    all_full = pack.deepcache(tiny, interval=3, start=0.95)
    assert torch.equal(run(all_full), baseline())
    assert stats[-1]["hits"] == 0 and stats[-1]["full"] == STEPS


@pytest.mark.parametrize("case", harness.CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("schedule", ["uniform", "non-uniform"])
def test_cases_follow_the_schedule_and_repeat(pack, tiny, baseline, stats, case, schedule):
    m = pack.deepcache(tiny, interval=3, schedule=schedule)
    a, b = run(m, case), run(m, case)
    assert torch.equal(a, b)  # state reset per run
    n = stats[-1]["steps"]
    assert n == STEPS  # ComfyUI samples `steps` steps at any denoise (from a longer schedule)
    sched = pack.full_steps(n, cache_interval=3, schedule=schedule)
    assert stats[-1]["full"] == sum(sched) and stats[-1]["hits"] == n - sum(sched) > 0
    err = harness.rel_err(a, baseline(case))
    assert 0 < err < 0.05, err
    if case.mask:  # inpaint: the unmasked half stays the input latent
        init = case.latent(SIZE)["samples"]
        assert torch.allclose(a[..., : SIZE // 2], init[..., : SIZE // 2], atol=1e-5)


def test_multi_call_sampler_is_keyed_on_sigma(pack, tiny, baseline, stats):
    m = pack.deepcache(tiny, interval=2)
    out = run(m, sampler="heun")  # two model calls per step
    sched = pack.full_steps(STEPS, cache_interval=2)
    assert stats[-1]["full"] == sum(sched) and stats[-1]["hits"] == STEPS - sum(sched)
    assert 0 < harness.rel_err(out, baseline(sampler="heun")) < 0.05


def _record_batches(model) -> list[int]:
    """A DIFFUSION_MODEL wrapper on `model` that records the batch of every UNet call."""
    import comfy.patcher_extension as pe

    seen = []

    def record(executor, *args, **kwargs):
        seen.append(args[0].shape[0])
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test.batches", record)
    return seen


def _no_room_to_batch_conds(monkeypatch):
    """Make the sampler's free-memory probe report nothing free, so it runs cond and uncond apart.

    ComfyUI 0.33 asks the model's patcher (`get_free_memory`); earlier ones ask model_management
    through comfy.samplers, which is given a view of it with that one function replaced.
    """
    import comfy.model_patcher
    import comfy.samplers

    if hasattr(comfy.model_patcher.ModelPatcher, "get_free_memory"):
        monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "get_free_memory", lambda self, *a, **k: 0)
    else:
        mm = comfy.samplers.model_management

        class NoRoom:
            def __getattr__(self, name):
                return getattr(mm, name)

            @staticmethod
            def get_free_memory(*a, **k):
                return 0

        monkeypatch.setattr(comfy.samplers, "model_management", NoRoom())


def test_cond_and_uncond_batched_apart(pack, tiny, stats, monkeypatch):
    m = pack.deepcache(tiny, interval=3)
    batches = _record_batches(m)
    together = run(m)
    assert set(batches) == {2}  # cond and uncond in one batch
    hits = stats[-1]["hits"]
    batches.clear()
    _no_room_to_batch_conds(monkeypatch)
    apart = run(m)
    assert set(batches) == {1} and len(batches) == 2 * STEPS  # one call per cond and step
    assert stats[-1]["hits"] == hits > 0  # each cond chunk finds its own kept feature
    torch.testing.assert_close(apart, together, rtol=1e-4, atol=1e-5)


def test_bad_input_is_a_clear_error_and_leaves_the_model(pack, tiny):
    before = harness.Snapshot.of(tiny)
    with pytest.raises(pack.errors.SDAccelError, match="cache_depth 12 is not a skip connection"):
        pack.deepcache(tiny, depth=12)
    with pytest.raises(pack.errors.SDAccelError, match="must be below end_percent"):
        pack.deepcache(tiny, start=0.6, end=0.4)
    with pytest.raises(pack.errors.SDAccelError, match="cache_interval"):
        pack.deepcache(tiny, interval=0)
    run(pack.deepcache(tiny, interval=3))
    assert before.diff(tiny) == []


# --- with Compile UNet -----------------------------------------------------------------------------

def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_compile_stacks_in_either_order(pack, tiny, stats):
    eager = run(pack.deepcache(tiny, interval=3, depth=1))
    cfg = pack.compile.CompileConfig(backend="inductor", torch_backend="eager")
    after = pack.deepcache(pack.comfy.apply_compile(tiny, cfg), interval=3, depth=1)
    before = pack.comfy.apply_compile(pack.deepcache(tiny, interval=3, depth=1), cfg)
    torch.testing.assert_close(run(after), eager, rtol=1e-4, atol=1e-5)
    run(before)  # warm both orders, then nothing compiles again (counted: a recompile error would fall back per block)
    graphs = _graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(run(before), eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(run(after), eager, rtol=1e-4, atol=1e-5)
    assert _graphs() == graphs
    assert stats[-1]["hits"] > 0
    unet = tiny.model.diffusion_model
    paths = {k[1]: cu for k, cu in pack.registry.compiled_of(unet).items() if isinstance(k, tuple)}
    assert set(paths) == {"deepcache full d1", "deepcache shallow d1"}
    assert all(cu.report.status in ("compiled", "partial") for cu in paths.values())
    assert pack.comfy.compile_report(after)["status"] in ("compiled", "partial")


# --- ControlNet -------------------------------------------------------------------------------------

def _tiny_controlnet(tiny):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops

    cfg = dict(tiny.model.model_config.unet_config)
    cfg.pop("out_channels")
    cfg.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device=torch.device("cpu"))
    net = comfy.cldm.cldm.ControlNet(**cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return comfy.controlnet.ControlNet(net, load_device=mm.get_torch_device(), manual_cast_dtype=None)


def test_controlnet_residuals_apply_on_the_blocks_that_run(pack, tiny, stats):
    import nodes

    cn = _tiny_controlnet(tiny)
    hint = torch.rand((1, SIZE * 8, SIZE * 8, 3), generator=torch.Generator().manual_seed(2))
    pos, neg = harness.conditioning()
    pos_c, _ = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, cn, hint, 1.0, 0.0, 1.0)
    eager = run(tiny, positive=pos_c)
    plain = run(tiny)
    m = pack.deepcache(tiny, interval=3)
    cached = run(m, positive=pos_c)
    assert stats[-1]["hits"] > 0 and stats[-1]["disabled"] is None
    err = harness.rel_err(cached, eager)
    assert 0 < err < 0.05 and harness.rel_err(cached, plain) > 5 * err  # the control is there, and close to eager


# --- ComfyUI's loader with the full SD1.5 architecture -------------------------------------------

@pytest.mark.parametrize("case", harness.CASES, ids=lambda c: c.name)
def test_real_checkpoint_cases(pack, sd15_model, stats, case):
    steps = 6
    base = harness.sample(sd15_model, case, steps=steps)
    m = pack.deepcache(sd15_model, interval=3)
    a = harness.sample(m, case, steps=steps)
    assert torch.equal(a, harness.sample(m, case, steps=steps))
    n = stats[-1]["steps"]
    assert stats[-1]["hits"] == n - math.ceil(n / 3) > 0
    assert 0 < harness.rel_err(a, base) < 0.25  # random weights: a bound for sanity, not a quality figure


# --- the Step Cache node on a UNet: DeepCache's cut of the same runtime ---------------------------

def step_cache(host, model, mode="fixed", interval=3, front=1, back=0, cfg="separate", schedule="uniform", start=0.0):
    return host.node("SDAccelStepCache").apply(model, mode, interval, front, back, 0.1, 3, start, 1.0, cfg, schedule)[0]


def test_step_cache_node_on_a_unet_is_deepcache_and_forecast_moves_the_kept_feature(pack, tiny, baseline, stats):
    for schedule in ("uniform", "non-uniform"):  # fixed: the DeepCache node's result bit for bit
        ours = run(step_cache(pack.host, tiny, front=2, schedule=schedule))
        assert torch.equal(ours, run(pack.deepcache(tiny, depth=1, schedule=schedule))), schedule
        assert stats[-1] == stats[-2] and stats[-1]["hits"] > 0
    fixed = run(step_cache(pack.host, tiny, schedule="rolling", start=0.3))
    fore = step_cache(pack.host, tiny, "forecast", schedule="rolling", start=0.3)
    a = run(fore)
    assert stats[-1]["hits"] == stats[-2]["hits"] > 0 and not torch.equal(a, fixed)
    assert torch.equal(run(fore), a)  # a second run starts from nothing
    assert harness.rel_err(a, baseline()) < 0.05


def test_step_cache_forecast_on_a_compiled_unet_does_not_recompile(pack, tiny, stats):
    eager = run(step_cache(pack.host, tiny, "forecast", interval=2))
    cfg = pack.compile.CompileConfig(torch_backend="eager")
    m = step_cache(pack.host, pack.comfy.apply_compile(tiny, cfg), "forecast", interval=2)
    torch.testing.assert_close(run(m), eager, rtol=1e-4, atol=1e-5)
    graphs = _graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(run(m), eager, rtol=1e-4, atol=1e-5)
    assert _graphs() == graphs  # counted: a recompile error would fall back per block and still match
    assert stats[-1]["hits"] > 0


@pytest.mark.parametrize("kw, match", [({"mode": "adaptive"}, "adaptive"), ({"cfg": "shared"}, "separate"), ({"back": 3}, "back_blocks"),
                                       ({"front": 13}, "cache_depth 12")])
def test_step_cache_settings_a_unet_cannot_take_are_clear_errors(pack, tiny, kw, match):
    before = dict(tiny.model_options)
    with pytest.raises(pack.errors.SDAccelError, match=match):
        step_cache(pack.host, tiny, **kw)
    assert tiny.model_options == before
