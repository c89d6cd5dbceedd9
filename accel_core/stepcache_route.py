"""The step cache's block entries: how a host's `patches_replace["dit"]` hooks reach a `StepCacheRun`.

ComfyUI's DiT forwards and Forge Neo's (ComfyUI-derived) ones offer block i to
`transformer_options["patches_replace"]["dit"][(name, i)]`. A `BlockReplacement` there hands
the call to its run, which runs the block (through the entry that was there before: another
pack's replacement still decides how the block runs) or stands in for it.

ComfyUI keeps the entries in a clone's model options and the run in a per-run copy of them
(hosts/comfy/stepcache.py): an entry finds the run, the call's sigma and cond/uncond lane in the
transformer_options of the block's args. Forge Neo's wrapper makes the entries per call, in its
copy of the call's transformer_options (`with_step_cache`, hosts/webui/stepcache.py), bound to
that call: Neo's Qwen-Image hands its blocks no transformer_options.
"""
from __future__ import annotations

from .stepcache import StepCacheRun

STEPCACHE_KEY = "sd_accel.stepcache"
# Switches a guidance pass sets to change what the blocks compute (ComfyUI's STG and modality
# guidance on LTX-2: an extra cond pass per step with some self-attention or the audio-video
# cross-attention off). Such a pass runs every block: the kept change is the unperturbed one.
PERTURBING = ("stg_self_attn_blocks",)
SEVERING = ("run_vx", "run_ax", "a2v_cross_attn", "v2a_cross_attn")


# What adds into the hidden state between blocks, outside them. A kept change measured over a full
# call's blocks would hold those additions, which a cached call's host code adds again after each
# skipped block. A ControlNet's output (the host marks its calls: CONTROLLED) does not depend on the
# features: the run keeps the change without it (`StepCacheRun.block`'s `between`). Post-block model
# patches (Qwen-Image's DiffSynth ControlNet, Z-Image's ControlNet) read the features a cached call
# never made: their calls run every block and the cache starts over after them.
CONTROLLED = "sd_accel.stepcache.controlled"
POST_BLOCK_PATCHES = ("double_block", "single_block", "noise_refiner", "context_refiner")
PATCHED_BETWEEN = "a model patch adds into the features between the blocks (Qwen-Image's DiffSynth or Z-Image's ControlNet)"


def patched_between(to: dict) -> bool:
    """Whether a post-block model patch acts on this call (see PATCHED_BETWEEN)."""
    patches = to.get("patches") or {}
    return any(patches.get(k) for k in POST_BLOCK_PATCHES)


def perturbed(to: dict) -> bool:
    """Whether a call's transformer_options make it a perturbed guidance pass (see PERTURBING / SEVERING)."""
    return any(to.get(k) for k in PERTURBING) or any(to.get(k, True) is False for k in SEVERING)


def lane_key(to: dict):
    """The cache lane of a call (`cfg="separate"`): its cond/uncond composition."""
    for name in ("cond_or_uncond", "uuids"):
        v = to.get(name)
        if v:
            return tuple(v)
    return "all"


def call_of(to: dict) -> tuple:
    """(run, lane, sigma) of a model call, from its transformer_options."""
    sigmas = to.get("sigmas")
    return to.get(STEPCACHE_KEY), lane_key(to), (float(sigmas.flatten()[0]) if sigmas is not None else None)


class BlockReplacement:
    """Our `patches_replace["dit"]` entry for one block; keeps the entry it replaced (`prior`).
    `bound`: the (run, lane, sigma) of the one call it was made for; else read from each block's args."""

    def __init__(self, point, prior=None, bound: tuple | None = None):
        self.point, self.prior, self.bound = point, prior, bound

    def _run(self, args, extra):
        if self.prior is not None:
            return self.prior(args, extra)
        return extra["original_block"](args)

    def __call__(self, args, extra):
        to = args.get("transformer_options") or {}
        run, lane, sigma = self.bound or call_of(to)
        if not isinstance(run, StepCacheRun) or not run.running or self.point not in run.cuts.pos or perturbed(to):
            return self._run(args, extra)
        if patched_between(to):  # every block, and the kept change is dropped: it would hold this call's additions
            run.restart(PATCHED_BETWEEN, run.cuts.pos[self.point] == 0, sigma)
            return self._run(args, extra)
        return run.block(self.point, args, lambda a: self._run(a, extra), lane, sigma, between=bool(to.get(CONTROLLED)))


def prior_entry(entry):
    """The entry behind ours (another pack's, or None): what a re-applied cache wraps again."""
    while isinstance(entry, BlockReplacement):
        entry = entry.prior
    return entry


def with_step_cache(to: dict, run: StepCacheRun) -> dict:
    """A copy of one call's transformer_options whose `patches_replace["dit"]` routes every cut point of `run`
    through it (wrapping the entry there before), bound to this call."""
    to = dict(to)
    bound = call_of({**to, STEPCACHE_KEY: run})
    replace = dict(to.get("patches_replace") or {})
    dit = dict(replace.get("dit") or {})
    for point in run.cuts.points:
        dit[point] = BlockReplacement(point, prior_entry(dit.get(point)), bound)
    replace["dit"] = dit
    to["patches_replace"] = replace
    return to


__all__ = ["STEPCACHE_KEY", "CONTROLLED", "BlockReplacement", "patched_between", "call_of", "lane_key", "perturbed", "prior_entry",
           "with_step_cache"]
