"""Step cache: skip the middle transformer blocks on steps where their effect barely changes.

A DiT runs the same stack of blocks at every sampling step, and the change the middle blocks
make to the hidden states (their residual) moves slowly from one step to the next. On a
"full" call every block runs and the residual of the middle blocks is kept; on a "cached"
call only the first `front_blocks` and the last `back_blocks` run, and the kept residual
stands in for the middle (DeepCache's idea on UNets; FBCache/DBCache and TaylorSeer on DiTs).

Which calls are cached (`mode`):
- fixed: a full call every `interval` steps, the calls of the steps between cached. `schedule`
  places the full steps: "rolling" counts from a lane's last full call; "uniform" and
  "non-uniform" are DeepCache's plans over the run's window (`plan`), the same for every call.
- adaptive: cached while the front blocks' residual differs from the one at the last full
  call by less than `threshold` (relative mean absolute difference), at most `max_cached` in a row.
- forecast: the fixed schedule, with the middle residual extrapolated to first order from the
  last two full calls (TaylorSeer) instead of reused as is.

The model is a flat list of cut points (the host's block replacements, in call order). A
middle block is one between the front and the back; consecutive middle blocks of the same
list form a span whose residual is kept per output ("img", "txt"), so a span never crosses
the glue between two block lists (Flux joins txt and img between its double and single blocks).
An output may be a tuple of tensors (LTX-2's img is its (video, audio) pair): its residual is
kept, forecast and added per element; adaptive measures its first element (the video).

DeepCache on UNets is this runtime cut at one skip connection (`deepcaching.py`): its runner asks
the run for the step decision (`wants_full`), keeps the up-path feature in the run's `kept`
(`kept.KeptFeatures`) and counts its calls in the run's log.

The decision is eager Python at the first middle block, outside compiled code: the blocks stay
the host's (compiled once each by Compile's regional compile), a cached call only calls fewer
of them. State lives in one `StepCacheRun` per sampling run; a clone of the model starts with
none. CFG: `cfg="separate"` keeps one lane (residuals, counters, decision) per cond/uncond
composition of a model call; `cfg="shared"` keeps one lane for every call of one input shape, so
when the host calls cond and uncond apart the later call reuses the earlier's residual of the same
step (calls of another shape, e.g. reference-image tokens on cond only, keep a lane each).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import events
from .errors import SDAccelError, check_range, choice_error
from .kept import KeptFeatures
from .log import logger
from .options import check_declared, option
from .stepplan import in_window, plan

MODES = ("fixed", "adaptive", "forecast")
CFG_MODES = ("separate", "shared")
SCHEDULES = ("rolling", "uniform", "non-uniform")


@dataclass(frozen=True)
class StepCacheConfig:
    """How to cache.

    Args:
        mode: "fixed", "adaptive" or "forecast" (see the module doc).
        interval: fixed/forecast: a full call every N steps (1 turns the cache off).
        front_blocks: blocks that always run before the cached middle (>= 1 for adaptive: their
            residual is what it measures).
        back_blocks: blocks that always run after the cached middle.
        threshold: adaptive: cache while the front residual's relative change since the last full call is below it.
        max_cached: adaptive: at most this many cached calls in a row (0 turns the cache off).
        start_percent, end_percent: the part of the whole denoising schedule (0: pure noise, 1: clean) in which
            calls may be cached; a run that covers only part of the schedule is placed in it (`StepCacheRun.begin`'s span).
        cfg: "separate" (one cache per cond/uncond composition) or "shared" (one for all calls of a shape).
        schedule: fixed/forecast: "rolling" (a full call `interval` steps after the lane's last one),
            "uniform" / "non-uniform" (DeepCache's plans: `plan`).
    """

    mode: str = option("forecast", "fixed: a full step every N steps, predictable speed. adaptive: caches while the first blocks' output "
                       "barely changes (speed depends on the image). forecast: the fixed schedule, extrapolating the cached change "
                       "from the last two full steps: less drift at the same speed, one more kept change in memory (large on long "
                       "videos).", label="Step Cache mode", choices=MODES)
    interval: int = option(3, "fixed/forecast: run every block every N steps; 1 turns the cache off. Higher is faster and drifts further.",
                           label="Step Cache interval (1 = off)", min=1, max=20, step=1)
    front_blocks: int = option(1, "Blocks that always run first. More: better quality, less saved per cached step. adaptive needs >= 1.",
                               label="Step Cache front blocks", min=0, max=64, step=1, per_model=True)
    back_blocks: int = option(0, "Blocks that always run last (they refine details). More: better quality, less saved.",
                              label="Step Cache back blocks", min=0, max=64, step=1, per_model=True)
    threshold: float = option(0.1, "adaptive: cache while the first blocks' output changed by less than this (relative) since the last "
                              "full step. Higher: more cached steps, more drift; 0 never caches.", label="Step Cache threshold",
                              min=0.0, max=10.0, step=0.005, hosts={"webui": {"max": 1.0}})  # a slider: 0.05-0.3 is typical
    max_cached: int = option(3, "adaptive: at most this many cached steps in a row, a bound on drift; 0 turns the cache off.",
                             label="Step Cache max cached in a row", min=0, max=50, step=1)
    start_percent: float = option(0.2, "Steps before this point of the denoising (0 = pure noise, 1 = clean) always run in full: the "
                                  "layout forms early, and a cached change there drifts through every later step (0.2: the first fifth of "
                                  "a plain schedule's steps). Lower: faster, more drift. It is a point of the whole schedule: a sampler "
                                  "that runs part of it (KSamplerAdvanced, Wan 2.2's two stages, denoise < 1) caches only where its steps "
                                  "fall in the window.",
                                  label="Step Cache start", min=0.0, max=1.0, step=0.01)
    end_percent: float = option(1.0, "Steps after this point of the denoising (0 = pure noise, 1 = clean) always run in full (lower it to "
                                "keep the last details exact). A point of the whole schedule, as start_percent.",
                                label="Step Cache end", min=0.0, max=1.0, step=0.01)
    cfg: str = option("separate", "separate: cond and uncond keep their own caches (safe). shared: one cache; when ComfyUI runs cond and "
                      "uncond apart, uncond reuses cond's cached change of the same step (faster, less exact; not where their shapes "
                      "differ, e.g. reference images on cond only). Identical when they run batched.", label="Step Cache CFG", choices=CFG_MODES)
    schedule: str = option("rolling", "fixed/forecast: rolling: a full step N steps after the last full one. uniform: a full step every "
                           "N steps from the start of the cached part (DeepCache's). non-uniform: as many full steps, packed where the "
                           "features change fastest (DeepCache's non-uniform).", label="Step Cache schedule", choices=SCHEDULES)

    def __post_init__(self):
        check_declared(self, "Step Cache")
        if self.mode not in MODES:
            raise choice_error("mode", self.mode, MODES)
        if self.cfg not in CFG_MODES:
            raise choice_error("cfg", self.cfg, CFG_MODES)
        if self.schedule not in SCHEDULES:
            raise choice_error("schedule", self.schedule, SCHEDULES)
        for name, lo in (("interval", 1), ("front_blocks", 0), ("back_blocks", 0), ("max_cached", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise SDAccelError(f"SD Accel Step Cache: {name} must be a whole number >= {lo}, found {v!r}.")
        check_range("Step Cache", "threshold", self.threshold, 0.0, 10.0, "It is a relative change: 0.05-0.3 is typical.")
        for name in ("start_percent", "end_percent"):
            check_range("Step Cache", name, getattr(self, name), 0.0, 1.0, "It is a point of the denoising schedule (0 = pure noise, 1 = clean).")
        if self.start_percent >= self.end_percent:
            raise SDAccelError(f"SD Accel Step Cache: start_percent ({self.start_percent}) must be below end_percent ({self.end_percent}).")
        if self.mode == "adaptive" and self.front_blocks < 1:
            raise SDAccelError("SD Accel Step Cache: adaptive mode measures the front blocks' residual, so front_blocks must be >= 1, found 0.")

    @property
    def enabled(self) -> bool:
        if self.mode == "adaptive":
            return self.max_cached > 0
        return self.interval > 1


@dataclass
class Lane:
    """One cache: the kept span residuals and the counters of the calls that share it."""

    residual: dict = field(default_factory=dict)  # span -> {output: tensor} at the last full call
    previous: dict = field(default_factory=dict)  # span -> {output: tensor} at the full call before (forecast)
    full_at: list = field(default_factory=list)  # steps of the last two full calls
    front_ref: torch.Tensor | None = None  # adaptive: the front residual at the last full call
    calls: int = 0
    in_a_row: int = 0  # consecutive cached calls
    last_step: int | None = None  # the step of the last full call
    meta: tuple | None = None


@dataclass
class Call:
    lane: Lane
    index: int
    step: int
    first_in: torch.Tensor | None = None
    cached: bool | None = None  # decided at the first middle block
    metric: float | None = None
    entry: dict = field(default_factory=dict)  # span -> {output: tensor} at the span's first block
    added: dict = field(default_factory=dict)  # span -> {output: what the host added between its blocks} (a ControlNet's)
    last_out: dict | None = None  # {output: copy of the last block's output}, to see what the host adds after it


def _is_state(v) -> bool:
    """A block output the cache keeps: a tensor, or a tuple of tensors (LTX-2's (video, audio) pair)."""
    return torch.is_tensor(v) or (isinstance(v, (tuple, list)) and len(v) > 0 and all(torch.is_tensor(t) for t in v))


def _each(fn, v, *more):
    """`fn` on a tensor, or per element on a tuple of tensors (with the matching elements of `more`)."""
    if torch.is_tensor(v):
        return fn(v, *more)
    return tuple(fn(*xs) for xs in zip(v, *more))


def _shape(v) -> tuple:
    return tuple(v.shape) if torch.is_tensor(v) else tuple(tuple(t.shape) for t in v)


def _lead(v) -> torch.Tensor:
    """The tensor a call is measured by and takes its dtype and device from: the output itself, or a tuple's first (LTX-2: the video)."""
    return v if torch.is_tensor(v) else v[0]


def extrapolate(r: torch.Tensor, prev: torch.Tensor | None, a: int | None, b: int | None, step: int) -> torch.Tensor:
    """Forecast: `r` (kept at full step b) moved on to `step` along its change since `prev` (full step a), to first order."""
    if prev is None or a is None or b is None or b <= a or prev.shape != r.shape:
        return r
    return r + (r - prev) * ((step - b) / (b - a))


class Cuts:
    """The flat list of cut points of one model and where the middle spans start and end."""

    def __init__(self, points: list[tuple[str, int]], front: int, back: int):
        self.points = list(points)
        self.pos = {p: i for i, p in enumerate(self.points)}
        n = len(self.points)
        if front + back >= n:
            raise SDAccelError(f"SD Accel Step Cache: front_blocks + back_blocks ({front} + {back}) must leave at least one "
                               f"of the model's {n} blocks to cache. Lower them (e.g. 1 and 0).")
        self.first_mid, self.end_mid = front, n - back
        self.span_of: dict[int, int] = {}
        self.span_start: set[int] = set()
        self.span_end: set[int] = set()
        span = -1
        for i in range(self.first_mid, self.end_mid):
            if i == self.first_mid or self.points[i][0] != self.points[i - 1][0]:
                span += 1
                self.span_start.add(i)
            if i == self.end_mid - 1 or self.points[i][0] != self.points[i + 1][0]:
                self.span_end.add(i)
            self.span_of[i] = span

    @property
    def cached_blocks(self) -> int:
        return self.end_mid - self.first_mid


def _rel_change(now: torch.Tensor, ref: torch.Tensor) -> float:
    return float((now.float() - ref.float()).abs().mean() / ref.float().abs().mean().clamp_min(1e-12))


class StepCacheRun:
    """One sampling run's step cache: lanes, counters and the decision per model call.

    A host makes one per run from the node's template (`fresh`), tells it the run's sigmas
    (`begin`), calls `block` from each block replacement and `finish` at the end. A whole-feature
    cut (DeepCache) asks `wants_full` per call, keeps its feature in `kept` and `record`s the call.
    """

    def __init__(self, config: StepCacheConfig, cuts: Cuts | None = None, owner: str = ""):
        self.config, self.cuts, self.owner = config, cuts, owner
        self.schedule: list[float] = []
        self.n_steps = 0
        self.span = (0.0, 1.0)  # the part of the whole denoising schedule this run covers (stepplan)
        self.full: list[bool] = []  # the uniform / non-uniform plan of this run
        self.disabled: str | None = None
        self.restarted: set[str] = set()
        self.lanes: dict[object, Lane] = {}
        self.kept = KeptFeatures()
        self.call: Call | None = None
        self.log: list[dict] = []  # one entry per model call: step, lane, cached, metric
        self.running = False

    def fresh(self) -> "StepCacheRun":
        return StepCacheRun(self.config, self.cuts, self.owner)

    def __deepcopy__(self, memo):  # a ComfyUI clone deep-copies model_options: a copy starts empty
        return self.fresh()

    # -- run boundaries --------------------------------------------------------------------
    def begin(self, sigmas=None, n_steps: int | None = None, span: tuple[float, float] = (0.0, 1.0)) -> "StepCacheRun":
        """Start a run over `sigmas` (decreasing; `n_steps` defaults to one less: sigmas end with the last one).
        `span`: where its first and last sigma lie in the whole denoising schedule (0: pure noise, 1: clean),
        for a run that covers part of it (a host that can tell; the start/end window is placed by it)."""
        self.schedule = [float(s) for s in sigmas] if sigmas is not None else []
        self.n_steps = max(len(self.schedule) - 1, 0) if n_steps is None else n_steps
        self.span = (float(span[0]), float(span[1]))
        self.full = plan(self.n_steps, self.config, self.span) if self.config.schedule != "rolling" else []
        self.lanes, self.call, self.log, self.running, self.disabled, self.restarted = {}, None, [], True, None, set()
        self.kept.clear()
        return self

    def disable(self, reason: str, what: str = "Step Cache") -> None:
        """Caching off for the rest of this run, with one log line."""
        if self.disabled is None:
            self.disabled = reason
            logger.warning("SD Accel %s: caching is off for this run: %s. Every block runs on every step.", what, reason)
        self.lanes = {}
        self.kept.clear()

    def restart(self, reason: str, first_block: bool, sigma: float | None) -> None:
        """A call that runs every block outside the cache (a full call in the log); what was kept is dropped, caching starts over."""
        if reason not in self.restarted:
            self.restarted.add(reason)
            logger.warning("SD Accel Step Cache: %s: such calls run every block, and the cache starts over after them.", reason)
        if first_block:
            self.log.append({"call": len(self.log), "step": self.step_of(sigma), "cached": False, "metric": None})
        self.lanes, self.call = {}, None
        self.kept.clear()

    def stats(self) -> dict:
        cached = sum(1 for e in self.log if e["cached"])
        total = len(self.log)
        c = self.config
        blocks = len(self.cuts.points) if self.cuts else 0
        skipped = cached * (self.cuts.cached_blocks if self.cuts else 0)
        return {"calls": total, "cached": cached, "full": total - cached, "mode": c.mode, "cfg": c.cfg,
                "cached_steps": [e["step"] for e in self.log if e["cached"]], "lanes": len(self.lanes), "span": list(self.span),
                "block_fraction": 1.0 - skipped / (blocks * total) if blocks and total else 1.0}

    def finish(self, report: bool = True) -> dict:
        stats = self.stats()
        if report and self.running and stats["calls"]:
            c = self.config
            logger.info("SD Accel Step Cache: %d/%d model calls cached (%s, front %d, back %d, cfg %s); %.0f%% of block evaluations ran%s.",
                        stats["cached"], stats["calls"], c.mode, c.front_blocks, c.back_blocks, c.cfg,
                        100 * stats["block_fraction"], f" [{self.owner}]" if self.owner else "")
            events.emit("stepcache_stats", **stats)
        self.running, self.lanes, self.call = False, {}, None
        self.kept.clear()
        return stats

    # -- per call --------------------------------------------------------------------------
    def step_of(self, sigma: float | None) -> int:
        """The schedule step a call's sigma belongs to: the last entry at or above it. Samplers that call
        the model more than once per step (heun, dpm_2, ...) evaluate it between two entries; those calls
        belong to the step they started from."""
        if sigma is None or not self.schedule:
            return 0
        step = 0
        for i in range(max(1, min(self.n_steps, len(self.schedule)))):
            s = self.schedule[i]
            if s >= sigma - 1e-4 * max(abs(s), 1e-6):
                step = i
            else:
                break
        return step

    def _in_window(self, step: int) -> bool:
        if self.n_steps < 1:  # no schedule known: the window cannot be placed, every call may cache
            return True
        return in_window(step, self.n_steps, self.config, self.span)

    def wants_full(self, step: int, last_full: int | None = None) -> bool:
        """The step decision: True where every block must run at `step` (adaptive then measures on the rest);
        `last_full`: the step of the cache's last full call (the "rolling" schedule counts from it)."""
        c = self.config
        if self.disabled is not None or not c.enabled or not self._in_window(step):
            return True
        if c.mode == "adaptive":
            return False
        if c.schedule != "rolling":
            return step >= len(self.full) or self.full[step] if self.full else step % c.interval == 0
        return last_full is None or step - last_full >= c.interval

    def record(self, step: int, cached: bool) -> None:
        """Count a call decided outside `block` (a whole-feature cut)."""
        self.log.append({"call": len(self.log), "step": step, "cached": cached, "metric": None})

    def _start_call(self, lane_key, sigma, x: torch.Tensor):
        meta = (_shape(x), _lead(x).dtype, _lead(x).device)
        # shared: one lane per input shape. Cond and uncond of different shapes (an edit model's reference tokens on
        # cond only, MiniMax H3's text packed into its tokens) would drop one lane's residual at every call.
        key = ("all", meta) if self.config.cfg == "shared" else lane_key
        lane = self.lanes.setdefault(key, Lane())
        if lane.meta is not None and lane.meta != meta:  # another size / batch: what was kept does not fit
            self.lanes[key] = lane = Lane()
        lane.meta = meta
        # Without the run's sigmas (a sampler that hid them), each call of a lane counts as a step.
        step = self.step_of(sigma) if sigma is not None and self.schedule else lane.calls
        self.call = Call(lane, lane.calls, step)
        lane.calls += 1

    def _decide(self, front: torch.Tensor | None) -> bool:
        call, c = self.call, self.config
        lane = call.lane
        have = bool(lane.residual)
        if c.cfg == "shared" and have and lane.last_step == call.step and self.log and self.log[-1]["step"] == call.step:
            return True  # a later call of the same step: the earlier call's residual is fresh
        if not have or self.wants_full(call.step, lane.last_step):
            return False
        if c.mode == "adaptive":
            if front is None or lane.front_ref is None or lane.front_ref.shape != front.shape:
                return False
            call.metric = _rel_change(front, lane.front_ref)
            return call.metric < c.threshold and lane.in_a_row < c.max_cached
        return True

    def _forecast(self, span: int, out: str, r):
        lane = self.call.lane
        prev = lane.previous.get(span, {}).get(out)
        if self.config.mode != "forecast" or len(lane.full_at) < 2 or prev is None or _shape(prev) != _shape(r):
            return r
        return _each(lambda r_, p_: extrapolate(r_, p_, *lane.full_at, self.call.step), r, prev)

    def block(self, point, args: dict, run_block, lane_key, sigma, between: bool = False) -> dict:
        """Run or stand in for the block at cut point `point`.

        args: the host's block inputs (tensors under output names such as "img", "txt");
        run_block(args) -> {output: tensor}: the host's block (and whatever replacement was there before).
        between: the host adds to the features between the blocks, independently of them (a ControlNet's
        output); a full call keeps the middle's change without those additions, which a cached call's host
        code adds again after each skipped block.
        """
        i = self.cuts.pos[point]
        if i == 0 or self.call is None:
            self._start_call(lane_key, sigma, args["img"])
            if self.config.mode == "adaptive":  # a copy: a block may add into its input in place (LTX-Video's)
                self.call.first_in = _lead(args["img"]).clone()
        call, cuts = self.call, self.cuts
        if i < cuts.first_mid or i >= cuts.end_mid:
            return run_block(args)
        lane = call.lane
        if call.cached is None:  # the first middle block: decide
            front = None
            now = _lead(args["img"])
            if self.config.mode == "adaptive" and call.first_in is not None:
                # the front blocks' change; a cut past a join of streams (Flux's single blocks take text + image)
                # has other shapes than the first block's input: there, the features entering the cut
                front = now - call.first_in if call.first_in.shape == now.shape else now.clone()
            call.cached = self._decide(front)
            self.log.append({"call": call.index, "step": call.step, "cached": call.cached, "metric": call.metric})
            if call.cached:
                lane.in_a_row += 1
            else:
                lane.in_a_row = 0
                lane.last_step = call.step
                lane.full_at = (lane.full_at + [call.step])[-2:]
                lane.previous, lane.residual = lane.residual, {}
                if front is not None:
                    lane.front_ref = front
                elif self.config.mode == "adaptive":
                    lane.front_ref = None
        span = cuts.span_of[i]
        if call.cached:
            kept = lane.residual.get(span)
            if kept is None or any(k not in args or _shape(args[k]) != _shape(v) for k, v in kept.items()):
                raise SDAccelError("SD Accel Step Cache: the kept residual does not fit this call's blocks "
                                   f"(cut point {point}); this is a bug, please report it with the model's family.")
            if i in cuts.span_start:
                return {k: _each(lambda a, r: a + r.to(a.dtype), args[k], self._forecast(span, k, v)) for k, v in kept.items()}
            return {k: args[k] for k in kept}
        if i in cuts.span_start:
            # A copy: the first block of the span may add into its input in place (0.33's Flux, LTX, H3).
            call.entry[span] = {k: _each(torch.clone, v) for k, v in args.items() if k in ("img", "txt") and _is_state(v)}
        elif between and call.last_out:  # what the host added since the last block returned
            acc = call.added.setdefault(span, {})
            for k, prev in call.last_out.items():
                if k in args and _shape(args[k]) == _shape(prev):
                    d = _each(torch.sub, args[k], prev)
                    acc[k] = _each(torch.add, acc[k], d) if k in acc else d
        out = run_block(args)
        if between and i not in cuts.span_end:  # a copy before the host adds into it (in place, as Flux's does)
            call.last_out = {k: _each(torch.clone, v) for k, v in out.items() if k in ("img", "txt") and _is_state(v)}
        if i in cuts.span_end:
            entry, added, call.last_out = call.entry.pop(span, {}), call.added.pop(span, {}), None
            lane.residual[span] = {k: _each(lambda o, e: (o - e).detach(), v, entry[k]) for k, v in out.items()
                                   if k in entry and _is_state(v) and _shape(v) == _shape(entry[k])}
            for k, a in added.items():
                if k in lane.residual[span] and _shape(a) == _shape(lane.residual[span][k]):
                    lane.residual[span][k] = _each(torch.sub, lane.residual[span][k], a)
        return out


def cut_points(module, hooks: bool = False) -> list[tuple[str, int]]:
    """The block hooks a host offers for `module` where a step cache may cut, in call order, from
    its family's block lists; `hooks`: the host puts BlockHooks in place where the forward has none."""
    from .families import families, family_of
    from .families.hooks import routed

    fam = family_of(module)
    points = [(bl.patch, i) for bl, mods in fam.block_lists(module) if bl.cut and routed(bl, module, hooks)
              for i in range(len(mods))] if fam else []
    if not points:
        able = ", ".join(f.display for f in families() if any(bl.patch and bl.cut and (bl.hooked or hooks) for bl in f.blocks))
        found = type(module).__name__ + (f" ({fam.display})" if fam else "")
        todo = "use DeepCache on UNets" if fam is not None and fam.skip_count else "use it on one of those models"
        raise SDAccelError(f"SD Accel Step Cache: expected a model whose blocks the host lets a node replace ({able}); "
                           f"found {found}. Step Cache cannot cut it: {todo}. The model was left unchanged.")
    return points


__all__ = ["StepCacheConfig", "StepCacheRun", "Cuts", "Lane", "KeptFeatures", "extrapolate", "cut_points", "plan", "MODES", "CFG_MODES", "SCHEDULES"]
