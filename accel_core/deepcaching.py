"""DeepCache: reuse the UNet's deep features across steps, run only the shallow blocks in between.

DeepCache (Ma, Fang, Wang, 2023; https://github.com/horseee/DeepCache) observes that the
high-level features a UNet computes in its deep blocks change slowly from one sampling step
to the next. So every `cache_interval` steps the whole UNet runs ("full step") and the
feature entering the up-path at one skip connection is kept; on the steps in between
("shallow steps") only the blocks above that skip connection run: the input blocks down to
it, then the output blocks from it, fed the kept feature instead of the deep branch.

`cache_depth` names that skip connection, counted from the shallowest: 0 is the skip from
the first conv (`conv_in`), 1 the one after the first res/attention layer, ... It equals the
`DeepCache` package's `cache_branch_id`; SD1.x/SD2.x UNets have 12 (0..11), SDXL 9 (0..8).
Shallower is faster and further from the full result.

DeepCache is the step cache (`stepcache.py`) cut at one skip connection: the config maps to
a `StepCacheConfig` (fixed mode, its uniform / non-uniform schedule; `front_blocks` and
`back_blocks` are the input and output blocks that run on shallow steps, `cache_depth + 1`),
the step decision and the per-run state (schedule, kept feature, counts) are the
`StepCacheRun`'s, and the kept up-path feature stands in for the middle's residual. The
decision is made in eager Python, outside any compiled code. The full path (which also hands
back the feature to keep) and the shallow path are two separate callables (the walks in
`families/`); with compile each is compiled once (`cut_paths`).

One runner (`DeepCacheRunner`: the host's side of a run) serves every host: ComfyUI through
`hosts/comfy/deepcache.py`, A1111 and Forge through `hosts/webui/`, diffusers'
UNet2DConditionModel through `deepcache(unet, config)` here.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from . import events
from .errors import SDAccelError
from .options import check_declared, option
from .log import logger
from .registry import compiled_for
from .families import family_of, skip_count
from .stepcache import StepCacheConfig, StepCacheRun, extrapolate
from .stepplan import plan

SCHEDULES = ("uniform", "non-uniform")
# Past 20 a run of 20-50 steps has one or two full steps left: it stops being a cache.
MAX_INTERVAL = 20
# Modes whose compiled outputs live in a CUDA-graph pool that the next replay overwrites.
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
_WEBUI_INTERVAL = ("Run every block every N steps; 1 turns the cache off. On SD1.x/SD2.x/SDXL UNets it is DeepCache's interval, "
                   "on DiT models (Flux, Chroma, Qwen-Image, Wan on Forge Neo) the Step Cache's. 3 is a good start, higher is faster and rougher.")


@dataclass(frozen=True)
class DeepCacheConfig:
    """How to cache. cache_depth counts skip connections from the shallowest (0 = the first conv's skip, the
    `DeepCache` package's `cache_branch_id`); "non-uniform" is the paper's non-uniform 1:N strategy."""

    cache_interval: int = option(3, "Run the full UNet every N steps; 1 turns DeepCache off. 3 is the paper's default, 5 is faster and rougher.",
                                 label="DeepCache interval (1 = off)", min=1, max=MAX_INTERVAL, step=1,
                                 # The webui's accordion starts with the cache off; its cache controls serve both caches
                                 # (DeepCache on a UNet, the Step Cache on a DiT: hosts/webui/options.py).
                                 hosts={"webui": {"default": 1, "label": "Cache interval (1 = off)", "help": _WEBUI_INTERVAL}})
    cache_depth: int = option(0, "Which skip connection cuts off the cached deep branch, from the shallowest (0, fastest) down; "
                              "SD1.x/SD2.x have 0-11, SDXL 0-8. Higher keeps more quality.", label="DeepCache depth", min=0, max=11, step=1,
                              per_model=True)  # check_depth holds it to the UNet's own skips
    start_percent: float = option(0.0, "Point of the denoising (0 = pure noise, 1 = clean) after which caching may start; earlier steps "
                                  "always run in full. A point of the whole schedule: a sampler that runs part of it (KSamplerAdvanced, "
                                  "a refiner stage, denoise < 1) caches only where its steps fall in the window.",
                                  label="DeepCache start", min=0.0, max=1.0, step=0.01,
                                  hosts={"webui": {"label": "Cache start", "help": "Fraction of the run's steps after which caching may start "
                                                   "(DeepCache on SD UNets, Step Cache on DiT models); earlier steps always run in full."}})
    end_percent: float = option(1.0, "Point of the denoising (0 = pure noise, 1 = clean) after which caching stops; later steps run in "
                                "full (raise detail at the end by lowering it). A point of the whole schedule, as start_percent.", label="DeepCache end", min=0.0, max=1.0, step=0.01,
                                hosts={"webui": {"label": "Cache end", "help": "Fraction of the run's steps after which caching stops "
                                                 "(DeepCache on SD UNets, Step Cache on DiT models); later steps run in full."}})
    schedule: str = option("uniform", "uniform: a full step every N steps. non-uniform: as many full steps, packed where the features change "
                           "fastest (the paper's non-uniform variant).", label="DeepCache schedule", choices=SCHEDULES)

    def __post_init__(self):
        if isinstance(self.cache_interval, bool) or not isinstance(self.cache_interval, int) or self.cache_interval < 1:
            raise SDAccelError(f"SD Accel DeepCache: cache_interval must be a whole number of steps >= 1, found {self.cache_interval!r}. Use 1 to turn caching off, 3 for the paper's default.")
        if isinstance(self.cache_depth, bool) or not isinstance(self.cache_depth, int) or self.cache_depth < 0:
            raise SDAccelError(f"SD Accel DeepCache: cache_depth must be a skip-connection index >= 0, found {self.cache_depth!r}. Use 0 (shallowest, fastest) unless you want more quality.")
        check_declared(self, "DeepCache")
        if self.start_percent >= self.end_percent:
            raise SDAccelError(f"SD Accel DeepCache: start_percent ({self.start_percent}) must be below end_percent ({self.end_percent}); no step would be cached. Set start_percent < end_percent, e.g. 0.0 and 1.0.")

    @property
    def enabled(self) -> bool:
        return self.cache_interval > 1

    def step_cache(self) -> StepCacheConfig:
        """The step cache's config for this cut: fixed, this schedule; the blocks that run on shallow steps
        are the input blocks down to skip `cache_depth` and the output blocks from it."""
        return StepCacheConfig(mode="fixed", interval=self.cache_interval, schedule=self.schedule, front_blocks=self.cache_depth + 1,
                               back_blocks=self.cache_depth + 1, start_percent=self.start_percent, end_percent=self.end_percent)


def unet_cut(config: StepCacheConfig) -> DeepCacheConfig:
    """The DeepCache cut a step-cache config asks of a UNet: skip `front_blocks - 1` (the input blocks
    that run), the output blocks that take those skips back as the back; fixed and forecast, per cond chunk."""
    where = "SD Accel Step Cache on a UNet"
    if config.mode == "adaptive":
        raise SDAccelError(f"{where}: adaptive mode is not available on UNets yet (it needs the front blocks' output before the path is "
                           "chosen); found mode 'adaptive'. Use 'fixed' or 'forecast'. The model was left unchanged.")
    if config.cfg != "separate":
        raise SDAccelError(f"{where}: cond and uncond keep their own kept features on UNets; found cfg {config.cfg!r}. Use 'separate'. "
                           "The model was left unchanged.")
    if config.front_blocks < 1 or config.back_blocks not in (0, config.front_blocks):
        raise SDAccelError(f"{where}: the cut is a skip connection: front_blocks (>= 1) input blocks run, and the output blocks that take "
                           f"their skips back; found front_blocks {config.front_blocks}, back_blocks {config.back_blocks}. Set back_blocks "
                           "to 0 (or equal to front_blocks). The model was left unchanged.")
    return DeepCacheConfig(cache_interval=config.interval, cache_depth=config.front_blocks - 1, start_percent=config.start_percent,
                           end_percent=config.end_percent)


def full_steps(n: int, config: DeepCacheConfig) -> list[bool]:
    """For a run of `n` steps: True where the full UNet runs, False where the deep features are reused."""
    return plan(n, config.step_cache())


# --- depth ----------------------------------------------------------------------------------

def check_depth(unet: nn.Module, config: DeepCacheConfig) -> None:
    n = skip_count(unet)
    if config.cache_depth >= n:
        raise SDAccelError(f"SD Accel DeepCache: cache_depth {config.cache_depth} is not a skip connection of this UNet, which has {n} (0..{n - 1}; SD1.x/SD2.x: 0..11, SDXL: 0..8). "
                           f"Pick a cache_depth between 0 and {n - 1}; the model was left unchanged.")


# --- the runner every host uses ------------------------------------------------------------------

@dataclass(frozen=True)
class DeepCachePaths:
    """A UNet cut at one depth: `full(*args)` -> (output, feature to keep), `shallow(kept, *args)` -> output.

    `copy_kept`: their outputs live in a CUDA-graph pool that the next replay overwrites, so
    the kept feature is copied out.
    """

    full: Callable
    shallow: Callable
    copy_kept: bool = False


def cut_paths(module: nn.Module, depth: int, full: Callable, shallow: Callable, compile_config=None) -> DeepCachePaths:
    """The two paths over `module`: eager, or each compiled once with `compile_config` (kept in the registry)."""
    if compile_config is None:
        return DeepCachePaths(full, shallow)
    return DeepCachePaths(compiled_for(module, compile_config, f"deepcache full d{depth}", full),
                          compiled_for(module, compile_config, f"deepcache shallow d{depth}", shallow),
                          copy_kept=compile_config.mode in _CUDAGRAPH_MODES)


class DeepCacheRunner:
    """DeepCache's per-call decision for every host: which path runs, what is kept, what is counted.

    The host says where a call is in the run, one of two ways:
    - the run's schedule (sigmas, timesteps) to `begin`, and each call's value to `step_at`
      (ComfyUI, diffusers);
    - the sampler's own step counter to `step_from_progress` (the webui's denoiser), which
      also notices a new pass (hires fix, next batch) and tells calls within a step apart;
    and which cond chunks the batch holds (`keys`). `select` then returns the callable for the
    call: the full path, which keeps its feature, or the shallow one from the kept feature.
    The step decision and the run's state (schedule, kept feature, counts) are the step cache's
    (`self.run`, a `StepCacheRun`). All of it runs in eager Python, outside compiled code. A copy
    (ComfyUI deep-copies model options on every clone) is a fresh runner: kept features belong to one run.
    """

    def __init__(self, config: DeepCacheConfig, paths: DeepCachePaths | None = None, steps: StepCacheConfig | None = None):
        # steps: the step cache's settings when the Step Cache node cuts a UNet (mode, schedule); else DeepCache's own.
        self.config, self.paths, self.steps = config, paths, steps
        self.run = StepCacheRun(steps or config.step_cache(), owner="DeepCache")
        self.runs: list[dict] = []  # the stats of the runs finished so far
        self._counter: list | None = None  # [total, step, calls in that step] when driven by step_from_progress

    def fresh(self) -> "DeepCacheRunner":
        return DeepCacheRunner(self.config, self.paths, self.steps)

    def __deepcopy__(self, memo):
        return self.fresh()

    @property
    def running(self) -> bool:
        return self.run.running

    # -- run boundaries -----------------------------------------------------------------
    def begin(self, schedule: Sequence[float] = (), n_steps: int | None = None, span: tuple[float, float] = (0.0, 1.0)) -> "DeepCacheRunner":
        """Start a run over `schedule` (decreasing sigmas or timesteps, `n_steps` its length unless given;
        empty: the host gives it on the first call); `span`: the part of the whole schedule it covers (StepCacheRun.begin)."""
        schedule = list(schedule)
        self.run.begin(schedule, len(schedule) if n_steps is None else n_steps, span)
        self._counter = None
        return self

    def stats(self) -> dict:
        """This run's counts by step: a step is a hit ("shallow") only if every model call in it was."""
        kinds: dict[int, bool] = {}
        for e in self.run.log:
            kinds[e["step"]] = kinds.get(e["step"], True) and e["cached"]
        hits = sum(kinds.values())
        total = len(kinds)
        return {"hits": hits, "full": total - hits, "ratio": hits / total if total else 0.0, "steps": self.run.n_steps,
                "interval": self.run.config.interval, "depth": self.config.cache_depth, "disabled": self.run.disabled}

    def finish(self) -> dict | None:
        """End the run (one log line, a `deepcache_stats` event); its stats, or None when none was running."""
        if not self.run.running:
            return None
        stats = self.stats()
        self.run.finish(report=False)
        c, off = self.run.config, self.run.disabled
        how = c.schedule if c.mode == "fixed" else f"{c.mode}, {c.schedule}"
        logger.info("SD Accel DeepCache: reused deep features on %d/%d steps (interval %d, depth %d, %s)%s.",
                    stats["hits"], stats["hits"] + stats["full"], c.interval, self.config.cache_depth, how, f"; off: {off}" if off else "")
        events.emit("deepcache_stats", **stats)
        self.runs.append(stats)
        return stats

    def disable(self, reason: str, step: int | None = None) -> None:
        """Caching off for the rest of the run (one log line); `step` is counted as a full one."""
        self.run.disable(reason, "DeepCache")
        if step is not None:
            self.run.record(step, False)

    # -- where a call is ----------------------------------------------------------------
    def step_at(self, value: float) -> int:
        return self.run.step_of(value)

    def step_from_progress(self, step: int, total: int) -> tuple[int, tuple]:
        """(step, keys) of a call told by the sampler's counter. A new run starts when the total
        changes or the step goes back; calls within a step (cond, uncond) are keyed by order."""
        c = self._counter
        if c is None or total != c[0] or step < c[1] or not self.run.running:
            self.finish()
            self.begin(list(range(total, 0, -1)), total)
            c = self._counter = [total, -1, 0]
        if step != c[1]:
            c[1], c[2] = step, 0
        c[2] += 1
        return step, (f"call{c[2] - 1}",)

    # -- per call -----------------------------------------------------------------------
    def select(self, step: int, keys: Sequence, x: torch.Tensor, paths: DeepCachePaths | None = None) -> Callable:
        """The callable for this call, taking the UNet's arguments: the full path (keeping the feature
        of chunks `keys` at `step`) or the shallow path from the feature kept for them."""
        paths = paths or self.paths
        run, store = self.run, self.run.kept
        store.check_metadata(x)
        cached = None if run.wants_full(step, store.last_full_step) else store.lookup(keys, x.shape[0])
        run.record(step, cached is not None)
        if cached is not None and run.config.mode == "forecast":
            cached = extrapolate(cached, store.lookup(keys, x.shape[0], age=1), store.step_of(1), store.step_of(0), step)
        if cached is not None:
            return functools.partial(paths.shallow, cached)

        def full(*args, **kwargs):
            out, kept = paths.full(*args, **kwargs)
            store.store(keys, kept.clone() if paths.copy_kept else kept, step)
            return out
        return full

    def __call__(self, step: int, keys: Sequence, x: torch.Tensor, *args, **kwargs):
        return self.select(step, keys, x)(x, *args, **kwargs)


# --- diffusers UNet2DConditionModel ------------------------------------------------------------

class DeepCacheUNet:
    """A diffusers UNet2DConditionModel with DeepCache: call it like the UNet.

    Each sampling run is bracketed by `begin(timesteps)` / `finish()` (or `with dc.run(timesteps):`)
    so the step of every call is known from its timestep. ControlNet / T2I-adapter residuals
    or GLIGEN turn caching off for the run (one log line): the UNet then runs in full.
    """

    def __init__(self, unet: nn.Module, config: DeepCacheConfig, compile=None):
        self.unet, self.config, self.compile_config = unet, config, compile
        d = config.cache_depth
        walk = family_of(unet).walk
        paths = cut_paths(unet, d, functools.partial(walk.full, unet, d), functools.partial(walk.shallow, unet, d), compile)
        self.full_path, self.shallow_path = paths.full, paths.shallow
        self.runner = DeepCacheRunner(config, paths)

    def stats(self) -> dict:
        """The current (or last finished) run's counts: hits, full, ratio, steps, interval, depth, disabled."""
        return self.runner.stats()

    def begin(self, timesteps) -> "DeepCacheUNet":
        self.runner.begin(_floats(timesteps))
        return self

    def finish(self) -> dict:
        return self.runner.finish() or self.runner.stats()

    @contextlib.contextmanager
    def run(self, timesteps):
        self.begin(timesteps)
        try:
            yield self
        finally:
            self.finish()

    def __call__(self, sample, timestep, encoder_hidden_states=None, class_labels=None, timestep_cond=None, attention_mask=None,
                 cross_attention_kwargs=None, added_cond_kwargs=None, down_block_additional_residuals=None,
                 mid_block_additional_residual=None, down_intrablock_additional_residuals=None, encoder_attention_mask=None,
                 return_dict: bool = True):
        if not self.runner.running:
            raise SDAccelError("SD Accel DeepCache: the step of this UNet call is unknown; expected `dc.begin(scheduler.timesteps)` (or `with dc.run(scheduler.timesteps):`) "
                               "before sampling. Call it once per image with the timesteps the scheduler will use.")
        kw = dict(class_labels=class_labels, timestep_cond=timestep_cond, attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs,
                  added_cond_kwargs=added_cond_kwargs, encoder_attention_mask=encoder_attention_mask)
        t = timestep if isinstance(timestep, torch.Tensor) else torch.tensor(float(timestep))
        step = self.runner.step_at(float(t.flatten()[0]))
        extras = dict(down_block_additional_residuals=down_block_additional_residuals, mid_block_additional_residual=mid_block_additional_residual,
                      down_intrablock_additional_residuals=down_intrablock_additional_residuals)
        if any(v is not None for v in extras.values()) or (cross_attention_kwargs or {}).get("gligen") is not None:
            self.runner.disable("ControlNet/T2I-adapter residuals or GLIGEN inputs reach the UNet, and DeepCache does not replay them on shallow steps", step)
            return self.unet(sample, timestep, encoder_hidden_states, **kw, **extras, return_dict=return_dict)
        out = self.runner(step, ("all",), sample, timestep, encoder_hidden_states, **kw)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


def _floats(values) -> list[float]:
    if isinstance(values, torch.Tensor):
        return values.detach().flatten().float().cpu().tolist()
    return [float(v) for v in values]


def deepcache(unet: nn.Module, config: DeepCacheConfig | None = None, *, compile=None) -> DeepCacheUNet:
    """DeepCache for a diffusers UNet2DConditionModel: a callable used in place of the UNet.

    The UNet itself is not modified. `compile` (a CompileConfig) compiles the full and the
    shallow paths, each once, with per-block fallback. ComfyUI models go through the node
    (`hosts/comfy/deepcache.apply_deepcache`), the webui through its extension.

    Example:
        >>> dc = deepcache(pipe.unet, DeepCacheConfig(cache_interval=3, cache_depth=0))
        >>> with dc.run(scheduler.timesteps):
        ...     for t in scheduler.timesteps:
        ...         eps = dc(latents_in, t, encoder_hidden_states=ctx).sample
    """
    config = config or DeepCacheConfig()
    fam = family_of(unet)
    if fam is None or fam.walk is None:  # the other families are cut by their host's walk (the nodes, the webui)
        raise SDAccelError(f"SD Accel DeepCache: deepcache() takes a diffusers UNet2DConditionModel, found {type(unet).__name__}. "
                           "For ComfyUI use the DeepCache (SD Accel) node.")
    fam.walk.check(unet)
    check_depth(unet, config)
    return DeepCacheUNet(unet, config, compile=compile)


__all__ = ["DeepCacheConfig", "DeepCacheRunner", "unet_cut", "DeepCachePaths", "cut_paths", "DeepCacheUNet", "deepcache", "full_steps",
           "skip_count", "check_depth", "SCHEDULES"]
