"""The plans of the step cache's "uniform" and "non-uniform" fixed schedules (DeepCache's): which steps
of a run of known length run every block. `config` is a StepCacheConfig (interval, window, schedule).

The window (`start_percent`..`end_percent`) is a part of the whole denoising schedule (0: pure
noise, 1: clean). A run covers `span` of it: (0, 1) for an ordinary run; less when a sampler runs
part of a schedule (ComfyUI's KSamplerAdvanced start/end steps, Wan 2.2 14B's high- and low-noise
stages, denoise < 1), where the host places the run by its first and last sigma."""
from __future__ import annotations

import math

# Non-uniform schedule: full steps packed around this point of the window (as a fraction of it)
# and thinned out towards both ends with this power (DeepCache's sample_from_quad_center idea).
NONUNIFORM_CENTER = 0.3
NONUNIFORM_POW = 1.4


def _nonuniform(m: int, k: int) -> list[int]:
    """k of the window's m steps, dense around NONUNIFORM_CENTER and sparse towards the ends; always step 0."""
    if k >= m:
        return list(range(m))
    c = NONUNIFORM_CENTER * (m - 1)
    p = NONUNIFORM_POW
    while p > 1.0:
        lo, hi = -(c ** (1 / p)), (m - 1 - c) ** (1 / p)
        xs = [lo + (hi - lo) * j / k for j in range(k)]  # k+1 points over [lo, hi]; the last (the end) is dropped
        idx = sorted({0} | {min(m - 1, max(0, int(round(c + math.copysign(abs(x) ** p, x))))) for x in xs})
        if len(idx) == k:
            return idx
        p -= 0.02
    return list(range(0, m, math.ceil(m / k)))[:k]


def position(step: int, n: int, span: tuple[float, float] = (0.0, 1.0)) -> float:
    """Where step `step` of a run of `n` steps that covers `span` of the schedule lies in the whole schedule."""
    a, b = span
    return round(a + (b - a) * step / n, 6) if n > 0 else a


def in_window(step: int, n: int, config, span: tuple[float, float] = (0.0, 1.0)) -> bool:
    return config.start_percent <= position(step, n, span) < config.end_percent


def plan(n: int, config, span: tuple[float, float] = (0.0, 1.0)) -> list[bool]:
    """For a run of `n` steps over `span` of the schedule: True where every block runs, False where the
    middle may be cached (the "uniform" / "non-uniform" schedules; the window's first step runs in full)."""
    if not config.enabled or n <= 0:
        return [True] * max(n, 0)
    window = [i for i in range(n) if in_window(i, n, config, span)]
    full = [True] * n
    if not window:
        return full
    first, m = window[0], len(window)
    if config.schedule == "non-uniform":
        chosen = _nonuniform(m, math.ceil(m / config.interval))
    else:
        chosen = range(0, m, config.interval)
    for i in window:
        full[i] = False
    for j in chosen:
        full[first + j] = True
    return full


__all__ = ["plan", "position", "in_window", "NONUNIFORM_CENTER", "NONUNIFORM_POW"]
