"""The Step Cache on Forge Neo's DiT models: the core's runtime (`StepCacheRun`), one run per sampling run.

Options: the accordion's cache controls serve both caches. On a DiT the interval, start and end
(DeepCache's on a UNet) with the Step Cache's mode, front/back blocks and threshold make its
StepCacheConfig; adaptive caches at most interval - 1 calls in a row, as the fixed schedule does.

Route: the DitWrapper (forge_dit.py) hands each model call's copy of transformer_options to
`StepCachePass.route`, which puts the core's block entries in it (stepcache_route: keyed like
ComfyUI's; another script's entry there still runs, ours wraps it).

Runs: Neo's k-diffusion samplers put each run's sigmas in the UNet patcher's
transformer_options (`sampling_sigmas`, a new tensor per run) and each call's sigma under
`sigmas`, as ComfyUI does. A new tensor begins a run, told the sigmas from the first call's on
(img2img starts part-way). Samplers without them get one run per pass (Forge builds one
DitWrapper per pass), each call of a lane counted as a step. `finish` ends the last run: one
log line and a `stepcache_stats` event, as on ComfyUI.
"""
from __future__ import annotations

from ...stepcache import Cuts, StepCacheConfig, StepCacheRun, cut_points
from ...stepcache_route import with_step_cache
from .options import WebuiOptions


def stepcache_config(opts: WebuiOptions) -> StepCacheConfig:
    """The StepCacheConfig the options ask of a DiT model (raises SDAccelError for a mix it refuses)."""
    return StepCacheConfig(**opts.core_values(StepCacheConfig), interval=opts.deepcache_interval, max_cached=opts.deepcache_interval - 1,
                           start_percent=opts.deepcache_start, end_percent=opts.deepcache_end)


def _from_first_call(sigmas, sigma) -> list[float] | None:
    """The run's sigmas from the first call's on (img2img samples the tail of the schedule)."""
    if sigmas is None:
        return None
    values = sigmas.detach().flatten().float().cpu().tolist()
    if sigma is None:
        return values
    first = float(sigma.detach().flatten().max())
    start = next((i for i, s in enumerate(values) if s <= first * (1 + 1e-4) + 1e-8), 0)
    return values[start:]


class StepCachePass:
    """The Step Cache of one Forge sampling pass: its run (begun afresh per sampler run) and the stats of the runs it finished."""

    def __init__(self, config: StepCacheConfig, module):
        """Raises SDAccelError, before anything is installed, when `module` cannot be cut as `config` asks."""
        self.run = StepCacheRun(config, Cuts(cut_points(module), config.front_blocks, config.back_blocks), owner="Forge")
        self.sigmas = None  # the sampler's `sampling_sigmas` the current run began with
        self.runs: list[dict] = []

    def route(self, to: dict) -> dict:
        """A copy of one call's transformer_options whose block entries go through this pass's run."""
        sigmas = to.get("sampling_sigmas")
        if not self.run.running or (sigmas is not None and sigmas is not self.sigmas):
            self.finish()
            self.run.begin(_from_first_call(sigmas, to.get("sigmas")))
            self.sigmas = sigmas
        return with_step_cache(to, self.run)

    def finish(self) -> list[dict]:
        """End the current run (its stats appended to `runs`); every finished run's stats."""
        if self.run.running:
            stats = self.run.finish()
            if stats["calls"]:
                self.runs.append(stats)
        self.sigmas = None
        return self.runs


__all__ = ["StepCachePass", "stepcache_config"]
