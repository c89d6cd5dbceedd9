"""The step cache's runtime on a host-free model that calls its blocks the way ComfyUI's Flux does.

`Toy` has two block lists joined by glue (double blocks on (img, txt), then img = cat(txt, img)
and single blocks on img), each block offered as a cut point, exactly as Flux's forward hands
its blocks to `patches_replace["dit"]`. The ComfyUI-level tests (real Flux / Qwen / Wan classes,
KSampler runs, compile) are in tests/integration/test_stepcache_comfy.py.
"""
import pytest
import torch

from sd_accel.accel_core.errors import SDAccelError
from sd_accel.accel_core.stepcache import Cuts, StepCacheConfig, StepCacheRun

D = 8


class Toy:
    def __init__(self, n_double=3, n_single=3, drift=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w = [torch.randn(D, D, generator=g) * 0.3 for _ in range(n_double * 2 + n_single)]
        self.points = [("double_block", i) for i in range(n_double)] + [("single_block", i) for i in range(n_single)]
        self.drift = drift  # step -> extra added by every block (a residual that moves linearly with the step)
        self.evals = 0

    def _blk(self, k, x, step):
        self.evals += 1
        if self.drift is not None:  # linear blocks: every residual is affine in the step
            return x @ self.w[k] * 0.5 + self.drift * step
        return torch.tanh(x @ self.w[k])

    def forward(self, img, txt, step, run=None, lane=("c",), sigma=None):
        nd = sum(1 for p in self.points if p[0] == "double_block")

        def call(point, args, fn):
            return run.block(point, args, fn, lane, sigma) if run is not None else fn(args)

        for i in range(nd):
            def double(a, i=i):
                return {"img": a["img"] + self._blk(2 * i, a["img"], step), "txt": a["txt"] + self._blk(2 * i + 1, a["txt"], step)}
            out = call(("double_block", i), {"img": img, "txt": txt, "vec": None}, double)
            img, txt = out["img"], out["txt"]
        img = torch.cat((txt, img), 1)
        for i in range(len(self.points) - nd):
            def single(a, i=i):
                return {"img": a["img"] + self._blk(2 * nd + i, a["img"], step)}
            img = call(("single_block", i), {"img": img, "vec": None}, single)["img"]
        return img[:, txt.shape[1]:]


def make_run(toy, n_steps=9, **kw):
    cfg = StepCacheConfig(**{"start_percent": 0.0, **kw})  # the mechanics from the first step (the default keeps a fifth full)
    run = StepCacheRun(cfg, Cuts(toy.points, cfg.front_blocks, cfg.back_blocks))
    return run.begin([1.0 - i / n_steps for i in range(n_steps + 1)])


def inputs(step=0, batch=1):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(batch, 4, D, generator=g), torch.randn(batch, 3, D, generator=g)


def sigma(step, n=9):
    return 1.0 - step / n


def test_fixed_schedule_caches_exactly_the_scheduled_steps_and_full_calls_equal_eager_bit_for_bit():
    toy = Toy()
    run = make_run(toy, mode="fixed", interval=3)
    for step in range(9):
        img, txt = inputs(step)
        got = toy.forward(img, txt, step, run, sigma=sigma(step))
        if step % 3 == 0:
            assert torch.equal(got, Toy().forward(img, txt, step)), step
    stats = run.finish()
    assert stats["cached_steps"] == [1, 2, 4, 5, 7, 8]
    assert stats["full"] == 3
    # A cached call ran the front block (1 double = 2 block evals) only: 3 full x 9 + 6 cached x 2.
    assert toy.evals == 3 * 9 + 6 * 2


def test_a_cached_call_with_an_unchanged_input_equals_the_full_call_across_the_double_single_glue():
    toy = Toy()
    run = make_run(toy, mode="fixed", interval=4, front_blocks=1, back_blocks=1)
    img, txt = inputs(0)
    full = toy.forward(img, txt, 0, run, sigma=sigma(0))
    cached = toy.forward(img, txt, 0, run, sigma=sigma(1))  # step 1: cached, same input: residual is exact
    assert run.stats()["cached_steps"] == [1]
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_forecast_extrapolates_a_linearly_moving_residual_where_plain_reuse_lags():
    drift = torch.full((D,), 0.05)
    errs = {}
    for mode in ("fixed", "forecast"):
        toy = Toy(drift=drift)
        run = make_run(toy, mode=mode, interval=3)
        img, txt = inputs(0)
        errs[mode] = []
        for step in range(9):
            got = toy.forward(img, txt, step, run, sigma=sigma(step))
            errs[mode].append(float((got - Toy(drift=drift).forward(img, txt, step)).abs().max()))
        assert run.finish()["cached_steps"] == [1, 2, 4, 5, 7, 8]
    # Before two full calls exist forecast is plain reuse; after, it is exact on a linear drift.
    assert errs["forecast"][1:3] == errs["fixed"][1:3]
    assert max(errs["forecast"][4:]) < 1e-4 < min(errs["fixed"][i] for i in (4, 5, 7, 8))


def test_adaptive_threshold_zero_never_caches_and_a_huge_threshold_caches_up_to_the_cap():
    for thr, cap, want in ((0.0, 5, []), (10.0, 2, [1, 2, 4, 5, 7, 8]), (10.0, 3, [1, 2, 3, 5, 6, 7])):
        toy = Toy()
        run = make_run(toy, mode="adaptive", threshold=thr, max_cached=cap)
        for step in range(9):
            img, txt = inputs(step)
            toy.forward(img, txt, step, run, sigma=sigma(step))
        assert run.finish()["cached_steps"] == want, (thr, cap)


def test_adaptive_measures_the_front_residual_change():
    toy = Toy()
    run = make_run(toy, mode="adaptive", threshold=0.01, max_cached=8)
    img, txt = inputs(0)
    for step in range(3):  # same input every step: the front residual does not change -> cached
        toy.forward(img, txt, 0, run, sigma=sigma(step))
    toy.forward(*inputs(5), 0, run, sigma=sigma(3))  # a different input -> full
    assert run.finish()["cached_steps"] == [1, 2]


def test_window_start_end_percent():
    toy = Toy()
    run = make_run(toy, mode="fixed", interval=2, start_percent=0.3, end_percent=0.7)
    for step in range(9):
        toy.forward(*inputs(step), step, run, sigma=sigma(step))
    # Steps 3..6 may cache; the full steps before the window count, so: full 2, cached 3, full 4, cached 5, full 6.
    assert run.finish()["cached_steps"] == [3, 5]


def test_cond_and_uncond_keep_separate_caches_or_share_one():
    # cond and uncond called apart (as ComfyUI does when they cannot be batched), static inputs.
    xs = {("c",): inputs(0), ("u",): inputs(1)}
    for cfg in ("separate", "shared"):
        toy = Toy()
        run = make_run(toy, mode="fixed", interval=3, cfg=cfg)
        outs = {}
        for step in range(3):
            for lane, (img, txt) in xs.items():
                outs[(step, lane)] = toy.forward(img, txt, 0, run, lane=lane, sigma=sigma(step))
        stats = run.finish()
        if cfg == "separate":
            assert stats["lanes"] == 2 and stats["cached_steps"] == [1, 1, 2, 2]
            for lane, (img, txt) in xs.items():  # each lane's own residual: exact for a static input
                torch.testing.assert_close(outs[(2, lane)], Toy().forward(img, txt, 0), rtol=1e-5, atol=1e-5)
        else:
            # one lane: uncond reuses cond's residual of the same step, so it is cached from step 0 on
            assert stats["lanes"] == 1 and stats["cached_steps"] == [0, 1, 1, 2, 2]
            assert not torch.allclose(outs[(0, ("u",))], Toy().forward(*xs[("u",)], 0), atol=1e-4)


def test_shared_cfg_keeps_one_lane_per_shape_when_cond_and_uncond_differ_in_length():
    # An edit model's cond carries reference-image tokens, its uncond none: the calls have different
    # lengths, no residual can serve both. One lane for all would be dropped at every call and never cache.
    img, txt = inputs(0)
    xs = {("c",): (torch.cat([img, inputs(1)[0][:, :3]], 1), txt), ("u",): (img, txt)}
    for cfg in ("separate", "shared"):
        toy = Toy()
        run = make_run(toy, mode="fixed", interval=3, cfg=cfg)
        outs = {}
        for step in range(3):
            for lane, x in xs.items():
                outs[(step, lane)] = toy.forward(*x, 0, run, lane=lane, sigma=sigma(step))
        stats = run.finish()
        assert stats["lanes"] == 2 and stats["cached_steps"] == [1, 1, 2, 2], (cfg, stats)
        for lane, x in xs.items():  # each lane its own residual: exact for a static input
            torch.testing.assert_close(outs[(2, lane)], Toy().forward(*x, 0), rtol=1e-5, atol=1e-5)


def test_state_is_per_run_and_a_shape_change_drops_what_was_kept():
    toy = Toy()
    run = make_run(toy, mode="fixed", interval=3)
    toy.forward(*inputs(0), 0, run, sigma=sigma(0))
    toy.forward(*inputs(1, batch=2), 1, run, sigma=sigma(1))  # another batch: nothing fits, full
    assert run.stats()["cached_steps"] == []
    run.finish()
    run2 = run.fresh().begin([1.0 - i / 9 for i in range(10)])
    assert run2.lanes == {} and run2.log == []
    toy.forward(*inputs(0), 0, run2, sigma=sigma(0))
    toy.forward(*inputs(1), 1, run2, sigma=sigma(1))
    assert run2.finish()["cached_steps"] == [1]


def test_bad_settings_say_what_to_do():
    with pytest.raises(SDAccelError, match="front_blocks"):
        Cuts(Toy().points, 4, 2)
    with pytest.raises(SDAccelError, match="mode"):
        StepCacheConfig(mode="sometimes")
    with pytest.raises(SDAccelError, match="front_blocks must be >= 1"):
        StepCacheConfig(mode="adaptive", front_blocks=0)
    with pytest.raises(SDAccelError, match="start_percent"):
        StepCacheConfig(start_percent=0.8, end_percent=0.2)
    assert not StepCacheConfig(interval=1).enabled and not StepCacheConfig(mode="adaptive", max_cached=0).enabled


def test_spans_never_cross_the_glue_between_block_lists():
    cuts = Cuts(Toy(3, 3).points, 1, 1)
    assert (cuts.first_mid, cuts.end_mid) == (1, 5)
    assert sorted(cuts.span_start) == [1, 3] and sorted(cuts.span_end) == [2, 4]


def test_without_the_runs_sigmas_each_call_counts_as_a_step():
    toy = Toy()
    cfg = StepCacheConfig(mode="fixed", interval=3)
    run = StepCacheRun(cfg, Cuts(toy.points, 1, 0)).begin(None)
    for step in range(7):
        toy.forward(*inputs(step), step, run, sigma=None)
    assert run.finish()["cached_steps"] == [1, 2, 4, 5]


@pytest.mark.parametrize("schedule, cached", [("rolling", [3, 5]), ("uniform", [4, 6])])
def test_window_start_rolling_counts_the_full_steps_before_it_uniform_starts_full(schedule, cached):
    toy = Toy()
    run = make_run(toy, mode="fixed", interval=2, start_percent=0.3, end_percent=0.7, schedule=schedule)
    for step in range(9):
        toy.forward(*inputs(step), step, run, sigma=sigma(step))
    assert run.finish()["cached_steps"] == cached


@pytest.mark.parametrize("schedule", ["rolling", "uniform"])
def test_the_window_is_a_part_of_the_whole_schedule_for_runs_that_cover_part_of_it(schedule):
    """Two runs that split 8 steps 4 + 4 (Wan 2.2 14B's high- and low-noise stages) with the window 0.25..0.75:
    the same steps of the whole schedule may cache as in one run of 8 steps; each stage's first step runs in full."""
    sig = [1.0 - i / 8 for i in range(9)]
    kw = dict(mode="fixed", interval=2, start_percent=0.25, end_percent=0.75, schedule=schedule)
    toy = Toy()
    whole = make_run(toy, n_steps=8, **kw)
    for step in range(8):
        toy.forward(*inputs(step), step, whole, sigma=sig[step])
    one = whole.finish()["cached_steps"]
    staged = []
    for first, span in ((0, (0.0, 0.5)), (4, (0.5, 1.0))):
        cfg = StepCacheConfig(**{"start_percent": 0.0, **kw})
        run = StepCacheRun(cfg, Cuts(toy.points, 1, 0)).begin(sig[first:first + 5], span=span)
        for step in range(4):
            toy.forward(*inputs(first + step), step, run, sigma=sig[first + step])
        stats = run.finish()
        assert stats["span"] == list(span)
        staged += [first + s for s in stats["cached_steps"]]
    # The window is steps 2..5 of 8 either way. Rolling: full 0, 1 (before it), cached 2, full 3, ...; in two stages
    # the second stage's first step (4) runs in full (nothing is kept yet), so 5 caches. Uniform: full 2, 4; cached 3, 5.
    assert one == ([2, 4] if schedule == "rolling" else [3, 5]), one
    assert staged == ([2, 5] if schedule == "rolling" else [3, 5]), staged
    from sd_accel.accel_core.stepplan import plan, position

    assert position(2, 4, (0.5, 1.0)) == 0.75 and plan(4, StepCacheConfig(**kw), (0.5, 1.0)) == [True, False, True, True]


def test_planned_schedules_cache_every_call_of_the_planned_steps_and_no_other():
    from sd_accel.accel_core.stepplan import plan

    for schedule in ("uniform", "non-uniform"):
        toy = Toy()
        run = make_run(toy, n_steps=12, mode="forecast", interval=3, schedule=schedule)
        full = plan(12, run.config)
        assert full == run.full and full[0] and sum(full) == 4
        for step in range(12):  # two calls per step at sigmas within it (a heun-like sampler)
            for s in (sigma(step, 12), sigma(step + 0.5, 12)):
                toy.forward(*inputs(step), step, run, sigma=s)
        got = run.finish()["cached_steps"]
        assert got == [i for i in range(12) for _ in range(2) if not full[i]], schedule
    assert plan(12, StepCacheConfig(interval=3, schedule="uniform")) != full  # non-uniform places them elsewhere
    with pytest.raises(SDAccelError, match="schedule"):
        StepCacheConfig(schedule="sometimes")


class PairToy:
    """Blocks the way ComfyUI's LTX-2 calls them: img is a (video, audio) pair, each block adds into
    both in place (and mixes them) and returns the pair."""

    def __init__(self, n=4, drift=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w = [(torch.randn(D, D, generator=g) * 0.3, torch.randn(D, D, generator=g) * 0.3) for _ in range(n)]
        self.points = [("double_block", i) for i in range(n)]
        self.drift = drift

    def forward(self, v, a, step, run=None, lane=("c",), sigma=None):
        v, a = v.clone(), a.clone()
        for i, (wv, wa) in enumerate(self.w):
            def block(args, wv=wv, wa=wa):
                v, a = args["img"]
                dv = v @ wv * 0.5 if self.drift is not None else torch.tanh(v @ wv)
                da = a @ wa * 0.5 if self.drift is not None else torch.tanh(a @ wa) + 0.1 * v.mean()
                if self.drift is not None:
                    dv, da = dv + self.drift * step, da - self.drift * step
                v.add_(dv)
                a.add_(da)
                return {"img": (v, a)}
            args = {"img": (v, a), "v_timestep": None}
            out = run.block(self.points[i], args, block, lane, sigma) if run is not None else block(args)
            v, a = out["img"]
        return v, a


def pair_inputs(step=0):
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(1, 5, D, generator=g), torch.randn(1, 3, D, generator=g)


def test_a_pair_output_is_kept_per_element_and_full_calls_equal_eager_bit_for_bit():
    toy = PairToy()
    run = make_run(toy, mode="fixed", interval=3, front_blocks=1, back_blocks=1)
    for step in range(4):
        v, a = pair_inputs(step)
        got = toy.forward(v, a, step, run, sigma=sigma(step))
        if step % 3 == 0:
            want = PairToy().forward(v, a, step)
            assert all(torch.equal(x, y) for x, y in zip(got, want)), step
    # step 3 was full; a cached call on its input: the kept residual of both elements is exact
    cached = toy.forward(*pair_inputs(3), 3, run, sigma=sigma(4))
    assert run.stats()["cached_steps"] == [1, 2, 4]
    for x, y in zip(cached, PairToy().forward(*pair_inputs(3), 3)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_forecast_extrapolates_each_element_of_a_pair():
    drift = torch.full((D,), 0.05)
    toy = PairToy(drift=drift)
    run = make_run(toy, mode="forecast", interval=3)
    v, a = pair_inputs(0)
    for step in range(9):
        got = toy.forward(v, a, step, run, sigma=sigma(step))
        if step >= 4:  # two full calls exist: exact on a linear drift, for video and audio alike
            for x, y in zip(got, PairToy(drift=drift).forward(v, a, step)):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    assert run.finish()["cached_steps"] == [1, 2, 4, 5, 7, 8]


def test_adaptive_on_a_pair_measures_its_first_element():
    toy = PairToy()
    run = make_run(toy, mode="adaptive", threshold=0.01, max_cached=8)
    v, a = pair_inputs(0)
    toy.forward(v, a, 0, run, sigma=sigma(0))
    toy.forward(v, a, 0, run, sigma=sigma(1))  # the same input: the video's front residual did not change -> cached
    toy.forward(pair_inputs(5)[0], a, 0, run, sigma=sigma(2))  # another video -> full
    assert run.finish()["cached_steps"] == [1]
