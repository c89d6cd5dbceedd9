"""The step cache's block entries: how a host's `patches_replace["dit"]` hooks reach a `StepCacheRun`.

ComfyUI's DiT forwards and Forge Neo's (ComfyUI-derived) ones offer block i to
`transformer_options["patches_replace"]["dit"][(name, i)]`. A `BlockReplacement` there hands
the call to the run kept under STEPCACHE_KEY in the same transformer_options, which runs the
block (through the entry that was there before: another pack's replacement still decides how
the block runs) or stands in for it. ComfyUI keeps the entries in a clone's model options and
the run in a per-run copy (hosts/comfy/stepcache.py); Forge Neo's wrapper puts both in its copy
of each call's transformer_options (`with_step_cache`, hosts/webui/stepcache.py).
"""
from __future__ import annotations

from .stepcache import StepCacheRun

STEPCACHE_KEY = "sd_accel.stepcache"


def lane_key(to: dict):
    """The cache lane of a call (`cfg="separate"`): its cond/uncond composition."""
    for name in ("cond_or_uncond", "uuids"):
        v = to.get(name)
        if v:
            return tuple(v)
    return "all"


class BlockReplacement:
    """Our `patches_replace["dit"]` entry for one block; keeps the entry it replaced (`prior`)."""

    def __init__(self, point, prior=None):
        self.point, self.prior = point, prior

    def _run(self, args, extra):
        if self.prior is not None:
            return self.prior(args, extra)
        return extra["original_block"](args)

    def __call__(self, args, extra):
        to = args.get("transformer_options") or {}
        run = to.get(STEPCACHE_KEY)
        if not isinstance(run, StepCacheRun) or not run.running or self.point not in run.cuts.pos:
            return self._run(args, extra)
        sigmas = to.get("sigmas")
        sigma = float(sigmas.flatten()[0]) if sigmas is not None else None
        return run.block(self.point, args, lambda a: self._run(a, extra), lane_key(to), sigma)


def prior_entry(entry):
    """The entry behind ours (another pack's, or None): what a re-applied cache wraps again."""
    while isinstance(entry, BlockReplacement):
        entry = entry.prior
    return entry


def with_step_cache(to: dict, run: StepCacheRun) -> dict:
    """A copy of a call's transformer_options whose `patches_replace["dit"]` routes every cut point of `run`
    through it (wrapping the entry there before), with `run` under STEPCACHE_KEY."""
    to = dict(to)
    replace = dict(to.get("patches_replace") or {})
    dit = dict(replace.get("dit") or {})
    for point in run.cuts.points:
        dit[point] = BlockReplacement(point, prior_entry(dit.get(point)))
    replace["dit"] = dit
    to["patches_replace"] = replace
    to[STEPCACHE_KEY] = run
    return to


__all__ = ["STEPCACHE_KEY", "BlockReplacement", "lane_key", "prior_entry", "with_step_cache"]
