"""LCM core: config checks, the distilled schedule, the consistency step, the DeepCache policy."""
import pytest
import torch

from sd_accel.accel_core import SDAccelError
from sd_accel.accel_core.lcm import (DEEPCACHE_MIN_STEPS, LcmConfig, boundary, deepcache_helps, lcm_sample,
                                     schedule)


def test_config_checks():
    assert LcmConfig().steps == 4 and LcmConfig().cfg == 1.5
    for bad in (dict(steps=0), dict(steps=51), dict(steps=2.5), dict(denoise=0.0), dict(denoise=1.5), dict(cfg=-1.0)):
        with pytest.raises(SDAccelError):
            LcmConfig(**bad)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_schedule_uses_distilled_timesteps(steps):
    ts, sig = schedule(steps)
    assert len(ts) == steps and len(sig) == steps + 1 and sig[-1] == 0
    assert torch.all(sig[:-1] > 0) and torch.all(sig[1:] < sig[:-1])
    assert all(int(t) % 20 == 19 for t in ts)  # 19, 39, ..., 999: LCM's 50 distilled timesteps
    assert int(ts[0]) == 999
    # sgm_uniform: evenly spaced in timestep space from 999 down to 19 (the last point dropped)
    if steps == 4:
        assert [int(t) for t in ts] == [999, 759, 499, 259]


def test_schedule_with_denoise_is_the_tail_of_a_longer_one():
    ts_full, sig_full = schedule(8)
    ts, sig = schedule(4, denoise=0.5)
    assert torch.equal(sig, sig_full[-5:]) and torch.equal(ts, ts_full[-4:])


def test_boundary_conditions():
    c_skip, c_out = boundary(torch.tensor(0.0))
    assert float(c_skip) == 1.0 and float(c_out) == 0.0  # at t=0 the model output is the input
    c_skip, c_out = boundary(torch.tensor(999.0))
    assert float(c_skip) < 1e-6 and abs(float(c_out) - 1.0) < 1e-6


@pytest.mark.parametrize("cfg", [1.0, 1.5])
def test_oracle_model_lands_on_its_x0(cfg):
    """With an eps-predictor that knows x0, LCM sampling returns x0 (up to c_skip at the last step)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 8, 8, generator=g)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    _, sig = schedule(4)
    calls = []

    def oracle(x_in, t, ctx):
        calls.append(x_in.shape[0])
        # x_in = x / sqrt(sigma^2 + 1) and x = x0 + sigma * eps: recover sigma from t's place in the schedule
        ts, sigmas = schedule(4)
        i = int((ts == t[0]).nonzero()[0])
        s = sigmas[i]
        x = x_in * (s ** 2 + 1) ** 0.5
        return (x - x0.expand_as(x)) / s

    out = lcm_sample(oracle, noise, LcmConfig(steps=4, cfg=cfg), cond=torch.zeros(1, 1, 1), uncond=torch.zeros(1, 1, 1), seed=1)
    assert ((out - x0).norm() / x0.norm()) < 1e-4
    assert calls == [2 if cfg != 1.0 else 1] * 4  # cfg 1.0 skips the uncond pass


def test_deepcache_policy():
    assert not deepcache_helps(4, 3) and not deepcache_helps(DEEPCACHE_MIN_STEPS - 1, 2)
    assert deepcache_helps(DEEPCACHE_MIN_STEPS, 2) and not deepcache_helps(DEEPCACHE_MIN_STEPS, 5) and deepcache_helps(10, 5)
