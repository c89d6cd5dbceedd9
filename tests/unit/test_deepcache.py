"""DeepCache core and the diffusers host: config, schedule, state, the two paths, compile, reference."""
import logging
import math
import types

import pytest
import torch

from sd_accel.accel_core import CompileConfig, SDAccelError, events
from sd_accel.accel_core.deepcaching import DeepCacheConfig, DeepCacheRunner, deepcache, full_steps, skip_count
from sd_accel.accel_core.families.diffusers import full as _diffusers_full, shallow as _diffusers_shallow

EAGER = dict(backend="inductor", torch_backend="eager")


def sd15_tiny(seed=0, **over):
    """SD1.5's block layout (4 levels, 2 res layers each, cross-attention in the first 3) at toy widths:
    12 skip connections, as in the real model, so depths mean the same as there."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 16, 16),
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
    cfg.update(over)
    return UNet2DConditionModel(**cfg).eval()


def sdxl_tiny(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=8, attention_head_dim=2, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4,
    ).eval()


def _inputs(seed=1, batch=2, side=8, cdim=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, side, side, generator=g), torch.tensor(500), torch.randn(batch, 7, cdim, generator=g)


TIMESTEPS = torch.linspace(999, 0, 10).round().long()


def sample_loop(call, seed=1, side=8, cdim=8, timesteps=TIMESTEPS):
    """A small Euler-like loop with CFG in one batch of 2 (enough to exercise the schedule)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, side, side, generator=g)
    ctx = torch.randn(2, 7, cdim, generator=g)
    with torch.no_grad():
        for t in timesteps:
            eps = call(x.expand(2, -1, -1, -1), t, ctx)
            e_c, e_u = eps.chunk(2)
            x = x - 0.05 * (e_u + 3.0 * (e_c - e_u))
    return x


def plain(unet):
    return lambda x, t, c: unet(x, t, c).sample


def cached(dc):
    return lambda x, t, c: dc(x, t, c).sample


def run_dc(dc, **kw):
    with dc.run(kw.pop("timesteps", TIMESTEPS)):
        return sample_loop(cached(dc), **kw)


@pytest.fixture
def unet():
    return sd15_tiny()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Toy UNets gain nothing from threads, and on a busy 2-core machine two threads thrash (20x slower).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- config and bad input ------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(cache_interval=0), "cache_interval must be a whole number of steps >= 1"),
    (dict(cache_interval=-2), "cache_interval"),
    (dict(cache_interval=2.5), "cache_interval"),
    (dict(cache_depth=-1), "cache_depth"),
    (dict(start_percent=0.5, end_percent=0.5), "must be below end_percent"),
    (dict(start_percent=0.8, end_percent=0.2), "must be below end_percent"),
    (dict(end_percent=1.5), r"end_percent must be a number in \[0, 1\]"),
    (dict(schedule="random"), "unknown schedule 'random'"),
])
def test_bad_config_is_a_clear_error(kw, match):
    with pytest.raises(SDAccelError, match=match):
        DeepCacheConfig(**kw)


def test_depth_the_model_does_not_have(unet):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(SDAccelError, match=r"cache_depth 12 is not a skip connection of this UNet, which has 12 \(0\.\.11"):
        deepcache(unet, DeepCacheConfig(cache_depth=12))
    assert "forward" not in unet.__dict__
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert skip_count(unet) == 12 and skip_count(sdxl_tiny()) == 9


def test_not_a_unet_and_no_run():
    with pytest.raises(SDAccelError, match="UNet2DConditionModel"):
        deepcache(torch.nn.Linear(2, 2))
    dc = deepcache(sd15_tiny())
    x, t, c = _inputs()
    with pytest.raises(SDAccelError, match=r"dc.begin\(scheduler.timesteps\)"):
        dc(x, t, c)


# --- schedule ------------------------------------------------------------------------------

def test_uniform_schedule():
    assert full_steps(7, DeepCacheConfig(cache_interval=1)) == [True] * 7
    assert [i for i, f in enumerate(full_steps(10, DeepCacheConfig(cache_interval=3))) if f] == [0, 3, 6, 9]
    # window: steps 0-2 and 8-9 full, caching from step 3 (30%) to 7 (< 80%)
    f = full_steps(10, DeepCacheConfig(cache_interval=2, start_percent=0.3, end_percent=0.8))
    assert [i for i, v in enumerate(f) if v] == [0, 1, 2, 3, 5, 7, 8, 9]


@pytest.mark.parametrize("n, interval", [(25, 3), (50, 3), (50, 5), (20, 2), (10, 4)])
def test_nonuniform_schedule(n, interval):
    f = full_steps(n, DeepCacheConfig(cache_interval=interval, schedule="non-uniform"))
    full = [i for i, v in enumerate(f) if v]
    assert len(full) == math.ceil(n / interval) and full[0] == 0
    if n >= 25:  # packed in the middle third, sparse at the end
        gaps = [b - a for a, b in zip(full, full[1:])]
        assert min(gaps[1:len(gaps) // 2 + 1]) < max(gaps[len(gaps) // 2:])
        assert full != list(range(0, n, interval))


def test_step_of_multi_call_samplers_and_state_chunks():
    run = DeepCacheRunner(DeepCacheConfig(cache_interval=2)).begin([14.6, 7.0, 3.0, 1.0, 0.0], 4).run
    assert [run.step_of(s) for s in (14.6, 10.0, 7.0, 5.2, 3.0, 1.0, 0.5)] == [0, 0, 1, 1, 2, 3, 3]
    assert [run.wants_full(i) for i in range(4)] == [True, False, True, False]
    st = run.kept
    h = torch.arange(4.0).reshape(4, 1)
    st.store(("c", "u"), h, 0)
    assert st.lookup(("c", "u"), 4) is h
    torch.testing.assert_close(st.lookup(("u",), 2), h[2:])  # batched apart on a later step
    torch.testing.assert_close(st.lookup(("u", "c"), 4), torch.cat([h[2:], h[:2]]))
    assert st.lookup(("other",), 2) is None and st.lookup(("c", "u"), 2) is None
    st.store(("c",), h[:2] + 10, 2)  # a later full step for "c" only: "u" is stale now
    assert st.lookup(("u",), 2) is None and st.lookup(("c", "u"), 4) is None
    st.check_metadata(torch.zeros(2, 4, 8, 8))
    st.check_metadata(torch.zeros(2, 4, 16, 16))  # new size: everything kept is dropped
    assert st.lookup(("c",), 2) is None


# --- the two paths ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [sd15_tiny, sdxl_tiny])
def test_full_path_is_the_forward_and_shallow_replays_it(make):
    unet = make()
    x, t, c = _inputs()
    kw = {}
    if unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 8), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        ref = unet(x, t, c, **kw).sample
        for d in range(skip_count(unet)):
            out, kept = _diffusers_full(unet, d, x, t, c, **kw)
            assert torch.equal(out, ref), d
            # shallow from a feature kept on the same inputs is the full result, bit for bit
            assert torch.equal(_diffusers_shallow(unet, d, kept, x, t, c, **kw), ref), d


def test_freeu_does_not_spoil_the_kept_feature(unet):
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    x, t, c = _inputs()
    with torch.no_grad():
        ref = unet(x, t, c).sample
        for d in (9, 10):  # cut inside the up blocks FreeU scales in place
            out, kept = _diffusers_full(unet, d, x, t, c)
            keep = kept.clone()
            assert torch.equal(out, ref)
            assert torch.equal(_diffusers_shallow(unet, d, kept, x, t, c), ref)
            assert torch.equal(kept, keep)


# --- sampling runs -------------------------------------------------------------------------

def test_interval_one_is_the_baseline_exactly(unet):
    dc = deepcache(unet, DeepCacheConfig(cache_interval=1))
    assert isinstance(dc.runner, DeepCacheRunner)  # the runner every host uses
    assert torch.equal(run_dc(dc), sample_loop(plain(unet)))
    assert dc.stats()["hits"] == 0


@pytest.mark.parametrize("cfg", [DeepCacheConfig(cache_interval=3), DeepCacheConfig(cache_interval=2, start_percent=0.2, end_percent=0.7),
                                 DeepCacheConfig(cache_interval=3, schedule="non-uniform", cache_depth=4)])
def test_counts_match_schedule_and_runs_repeat(unet, cfg):
    seen = []
    listener = lambda e, d: seen.append(d) if e == "deepcache_stats" else None  # noqa: E731
    events.subscribe(listener)
    try:
        dc = deepcache(unet, cfg)
        a, b = run_dc(dc), run_dc(dc)
    finally:
        events.unsubscribe(listener)
    sched = full_steps(len(TIMESTEPS), cfg)
    assert seen[0]["full"] == sum(sched) and seen[0]["hits"] == len(sched) - sum(sched) > 0
    assert seen[0] == seen[1] and seen[0]["ratio"] == pytest.approx(seen[0]["hits"] / len(sched))
    assert torch.equal(a, b)  # state reset between runs
    base = sample_loop(plain(unet))
    err = ((a - base).norm() / base.norm()).item()
    assert 0 < err < 0.05


def test_a_run_never_reuses_the_previous_runs_features(unet):
    dc = deepcache(unet, DeepCacheConfig(cache_interval=4))
    run_dc(dc, seed=5)
    fresh = deepcache(unet, DeepCacheConfig(cache_interval=4))
    assert torch.equal(run_dc(dc, seed=6), run_dc(fresh, seed=6))


def test_summary_line_and_size_change_mid_run(unet, caplog):
    dc = deepcache(unet, DeepCacheConfig(cache_interval=3))
    g = torch.Generator().manual_seed(0)
    c = torch.randn(2, 7, 8, generator=g)
    with caplog.at_level(logging.INFO, logger="sd_accel"), torch.no_grad(), dc.run(TIMESTEPS[:4]):
        for i, t in enumerate(TIMESTEPS[:4]):
            side = 8 if i < 2 else 16  # new size on step 2: nothing kept fits, so the step runs full
            out = dc(torch.randn(2, 4, side, side, generator=g), t, c).sample
            assert out.shape[-1] == side
    assert dc.stats()["hits"] == 1  # steps 0 (full), 1 (shallow), 2 (new size: full), 3 (full)
    lines = [r.getMessage() for r in caplog.records if "reused deep features" in r.getMessage()]
    assert lines == ["SD Accel DeepCache: reused deep features on 1/4 steps (interval 3, depth 0, uniform)."]


def test_controlnet_residuals_turn_caching_off_for_the_run(unet, caplog):
    x, t, c = _inputs()
    with torch.no_grad():
        _, feats = _diffusers_full(unet, 11, x, t, c)
        # residuals shaped like the down path's skips (what a diffusers ControlNet returns)
        skips = []
        unet.conv_in.register_forward_hook(lambda m, i, o: skips.append(o))
        for b in unet.down_blocks:
            b.register_forward_hook(lambda m, i, o: skips.extend(o[1]))
        unet(x, t, c)
    res = tuple(torch.randn_like(s) * 0.1 for s in skips)
    mid = torch.randn_like(feats) * 0.1
    dc = deepcache(unet, DeepCacheConfig(cache_interval=2))
    with caplog.at_level(logging.WARNING, logger="sd_accel"), torch.no_grad(), dc.run(TIMESTEPS[:3]):
        for tt in TIMESTEPS[:3]:
            out = dc(x, tt, c, down_block_additional_residuals=res, mid_block_additional_residual=mid).sample
            assert torch.equal(out, unet(x, tt, c, down_block_additional_residuals=res, mid_block_additional_residual=mid).sample)
    assert dc.stats()["hits"] == 0 and "ControlNet" in dc.stats()["disabled"]
    assert sum("caching is off for this run" in r.getMessage() for r in caplog.records) == 1


# --- compile ---------------------------------------------------------------------------------

def test_compiled_paths_match_eager_and_do_not_recompile(unet):
    cfg = DeepCacheConfig(cache_interval=3, cache_depth=2)
    eager = run_dc(deepcache(unet, cfg))
    dc = deepcache(unet, cfg, compile=CompileConfig(fullgraph=True, **EAGER))
    torch.testing.assert_close(run_dc(dc), eager)
    assert dc.full_path.report.status == "compiled" and dc.shallow_path.report.status == "compiled"
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(run_dc(dc, seed=3), run_dc(deepcache(unet, cfg), seed=3))


# --- reference: the DeepCache package's helper ---------------------------------------------------

@pytest.mark.parametrize("branch", [0, 1, 2, 3, 5, 9])
def test_matches_the_deepcache_package(unet, branch):
    helper_mod = pytest.importorskip("DeepCache", reason="the DeepCache package (pip install DeepCache --no-deps) is the reference")
    base = sample_loop(plain(unet))
    pipe = types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(timesteps=TIMESTEPS))
    helper = helper_mod.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    helper.enable()
    try:
        ref = sample_loop(plain(unet))
    finally:
        helper.disable()
    ours = run_dc(deepcache(unet, DeepCacheConfig(cache_interval=3, cache_depth=branch)))
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, base)



# --- the step cache's modes on the UNet cut ----------------------------------------------------

def test_forecast_extrapolates_a_linearly_moving_kept_feature_and_fixed_reuses_it():
    from sd_accel.accel_core.deepcaching import DeepCachePaths, unet_cut
    from sd_accel.accel_core.stepcache import StepCacheConfig

    base, delta = torch.arange(4.0).reshape(2, 2), torch.ones(2, 2)
    paths = DeepCachePaths(full=lambda x, step: (x, base + delta * step), shallow=lambda kept, x, step: kept)
    got = {}
    for mode in ("fixed", "forecast"):
        steps = StepCacheConfig(mode=mode, interval=3, front_blocks=1, start_percent=0.0)
        runner = DeepCacheRunner(unet_cut(steps), paths, steps=steps).begin(list(range(9, 0, -1)))
        x = torch.zeros(2, 2)
        got[mode] = [runner.select(s, ("c", "u"), x)(x, s) for s in range(9)]
        assert runner.finish()["hits"] == 6
    for s in (4, 5, 7, 8):  # shallow steps after two full ones (0, 3, 6)
        torch.testing.assert_close(got["forecast"][s], base + delta * s)
        torch.testing.assert_close(got["fixed"][s], base + delta * (s // 3 * 3))
    torch.testing.assert_close(got["forecast"][1], base)  # one full step so far: nothing to extrapolate from
    assert unet_cut(StepCacheConfig(front_blocks=3, interval=4)) == DeepCacheConfig(cache_interval=4, cache_depth=2, start_percent=0.2)
    with pytest.raises(SDAccelError, match="adaptive"):
        unet_cut(StepCacheConfig(mode="adaptive"))
