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

The decision full/shallow is made here, in eager Python, outside any compiled code. The
full path (which also hands back the feature to keep) and the shallow path are two separate
callables; with compile each is compiled once (`accel_core.compile(..., entry=...)`).

Hosts: ComfyUI's UNetModel through `hosts/comfy_deepcache.py`; diffusers'
UNet2DConditionModel through `deepcache(unet, config)` here.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from . import events
from .errors import SDAccelError, choice_error
from .log import logger
from .unet import DIFFUSERS, LDM, unet_kind

SCHEDULES = ("uniform", "non-uniform")
# Non-uniform schedule: full steps packed around this point of the window (as a fraction of it)
# and thinned out towards both ends with this power (the paper's sample_from_quad_center idea).
NONUNIFORM_CENTER = 0.3
NONUNIFORM_POW = 1.4
# Modes whose compiled outputs live in a CUDA-graph pool that the next replay overwrites.
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class DeepCacheConfig:
    """How to cache.

    Args:
        cache_interval: run the full UNet every N steps (1 turns DeepCache off; the paper uses 3 to 5).
        cache_depth: the skip connection at which the deep branch is cut, counted from the
            shallowest (0 = the first conv's skip, the `DeepCache` package's `cache_branch_id`).
        start_percent: caching may start at this fraction of the run's steps (earlier steps are full).
        end_percent: caching stops at this fraction of the run's steps (later steps are full).
        schedule: "uniform" (a full step every `cache_interval` steps) or "non-uniform" (the same
            number of full steps, packed where features change fastest, as in the paper's
            non-uniform 1:N strategy).
    """

    cache_interval: int = 3
    cache_depth: int = 0
    start_percent: float = 0.0
    end_percent: float = 1.0
    schedule: str = "uniform"

    def __post_init__(self):
        if isinstance(self.cache_interval, bool) or not isinstance(self.cache_interval, int) or self.cache_interval < 1:
            raise SDAccelError(f"SD Accel DeepCache: cache_interval must be a whole number of steps >= 1, found {self.cache_interval!r}. Use 1 to turn caching off, 3 for the paper's default.")
        if isinstance(self.cache_depth, bool) or not isinstance(self.cache_depth, int) or self.cache_depth < 0:
            raise SDAccelError(f"SD Accel DeepCache: cache_depth must be a skip-connection index >= 0, found {self.cache_depth!r}. Use 0 (shallowest, fastest) unless you want more quality.")
        if not (0.0 <= self.start_percent <= 1.0 and 0.0 <= self.end_percent <= 1.0):
            raise SDAccelError(f"SD Accel DeepCache: start_percent and end_percent are fractions of the run between 0 and 1, found {self.start_percent} and {self.end_percent}. Use e.g. 0.0 and 1.0.")
        if self.start_percent >= self.end_percent:
            raise SDAccelError(f"SD Accel DeepCache: start_percent ({self.start_percent}) must be below end_percent ({self.end_percent}); no step would be cached. Set start_percent < end_percent, e.g. 0.0 and 1.0.")
        if self.schedule not in SCHEDULES:
            raise choice_error("schedule", self.schedule, SCHEDULES)

    @property
    def enabled(self) -> bool:
        return self.cache_interval > 1


# --- schedule ----------------------------------------------------------------------------------

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


def full_steps(n: int, config: DeepCacheConfig) -> list[bool]:
    """For a run of `n` steps: True where the full UNet runs, False where the deep features are reused."""
    if not config.enabled or n <= 0:
        return [True] * max(n, 0)
    window = [i for i in range(n) if config.start_percent <= i / n < config.end_percent]
    full = [True] * n
    if not window:
        return full
    first, m = window[0], len(window)
    if config.schedule == "uniform":
        chosen = range(0, m, config.cache_interval)
    else:
        chosen = _nonuniform(m, math.ceil(m / config.cache_interval))
    for i in window:
        full[i] = False
    for j in chosen:
        full[first + j] = True
    return full


# --- per-run state ------------------------------------------------------------------------------

class DeepCacheState:
    """What one sampling run knows: its schedule, the kept deep features, and counts.

    Hosts start it per run (`begin`) and close it (`finish`), which logs one line and emits
    `deepcache_stats`. The kept features are dropped when the input's shape, dtype or device
    change. A fresh `DeepCacheState` holds no tensors, so copying one (ComfyUI deep-copies
    model options on every clone) is cheap.
    """

    def __init__(self, config: DeepCacheConfig, depth_label: str = ""):
        self.config = config
        self.depth_label = depth_label
        self.running = False
        self._reset_run()

    def _reset_run(self):
        self.schedule: list[float] = []
        self.n_steps = 0
        self.full: list[bool] = []
        self.disabled: str | None = None
        self.step_kinds: dict[int, str] = {}  # step -> "full" | "shallow"
        self.clear_cache()

    def clear_cache(self):
        self._whole: dict[tuple, torch.Tensor] = {}
        self._chunks: dict[object, torch.Tensor] = {}
        self._captured_at: dict[object, int] = {}
        self.last_full_step: int | None = None
        self._meta = None

    def fresh(self) -> "DeepCacheState":
        return DeepCacheState(self.config, self.depth_label)

    def __deepcopy__(self, memo):
        # Kept features belong to one run; a copy (a ComfyUI clone) starts empty.
        return self.fresh()

    # -- run boundaries -----------------------------------------------------------------
    def begin(self, schedule: Sequence[float], n_steps: int | None = None) -> "DeepCacheState":
        """Start a run over `schedule` (decreasing sigmas or timesteps; `n_steps` defaults to its length)."""
        self._reset_run()
        self.schedule = [float(s) for s in schedule]
        self.n_steps = len(self.schedule) if n_steps is None else n_steps
        self.full = full_steps(self.n_steps, self.config)
        self.running = True
        return self

    def disable(self, reason: str) -> None:
        """Turn caching off for the rest of this run, with one log line."""
        if self.disabled is None:
            self.disabled = reason
            logger.warning("SD Accel DeepCache: caching is off for this run: %s. The full UNet runs on every step.", reason)
        self.clear_cache()

    def finish(self) -> dict:
        """End the run: one summary line and a `deepcache_stats` event. Returns the stats."""
        stats = self.stats()
        if self.running:
            c = self.config
            total = stats["hits"] + stats["full"]
            logger.info("SD Accel DeepCache: reused deep features on %d/%d steps (interval %d, depth %d%s, %s)%s.",
                        stats["hits"], total, c.cache_interval, c.cache_depth, self.depth_label, c.schedule,
                        f"; off: {self.disabled}" if self.disabled else "")
            events.emit("deepcache_stats", **stats)
        self.running = False
        self.clear_cache()
        return stats

    def stats(self) -> dict:
        hits = sum(1 for k in self.step_kinds.values() if k == "shallow")
        full = sum(1 for k in self.step_kinds.values() if k == "full")
        total = hits + full
        return {"hits": hits, "full": full, "ratio": hits / total if total else 0.0, "steps": self.n_steps,
                "interval": self.config.cache_interval, "depth": self.config.cache_depth, "disabled": self.disabled}

    # -- per call -----------------------------------------------------------------------
    def step_of(self, value: float) -> int:
        """The step a model call belongs to: the last schedule entry at or above `value`.

        Samplers that call the model more than once per step (heun, dpm_2, ...) evaluate it at
        sigmas between two schedule entries; those calls belong to the step they started from.
        """
        n = max(1, min(self.n_steps, len(self.schedule)))
        step = 0
        for i in range(n):
            s = self.schedule[i]
            if s >= value - 1e-4 * max(abs(s), 1e-6):
                step = i
            else:
                break
        return step

    def wants_full(self, step: int) -> bool:
        if self.disabled is not None or not self.config.enabled:
            return True
        return step >= len(self.full) or self.full[step]

    def check_metadata(self, x: torch.Tensor) -> None:
        meta = (x.device, x.dtype, tuple(x.shape[1:]))
        if self._meta is not None and meta != self._meta:
            logger.info("SD Accel DeepCache: input shape, dtype or device changed; dropping the kept features.")
            self.clear_cache()
        self._meta = meta

    def store(self, keys: Sequence, h: torch.Tensor, step: int) -> None:
        """Keep `h` (the batch of chunks `keys`, equal slices in order) as captured at full step `step`."""
        keys = tuple(keys)
        if self.last_full_step != step:
            self.last_full_step = step
            self._whole.clear()
        self._whole[keys] = h
        per = h.shape[0] // len(keys) if keys and h.shape[0] % len(keys) == 0 else None
        for i, k in enumerate(keys):
            if per is not None:
                self._chunks[k] = h[i * per:(i + 1) * per]
            else:
                self._chunks.pop(k, None)
            self._captured_at[k] = step

    def lookup(self, keys: Sequence, batch: int) -> torch.Tensor | None:
        """The kept feature for these chunks from the latest full step, or None (then run full)."""
        keys = tuple(keys)
        if self.last_full_step is None:
            return None
        h = self._whole.get(keys)
        if h is not None and h.shape[0] == batch:
            return h
        # Chunks batched differently than on the full step (ComfyUI batches cond/uncond by free memory).
        parts = []
        for k in keys:
            t = self._chunks.get(k)
            if t is None or self._captured_at.get(k) != self.last_full_step:
                return None
            parts.append(t)
        h = torch.cat(parts) if len(parts) > 1 else parts[0]
        return h if h.shape[0] == batch else None

    def mark(self, step: int, full: bool) -> None:
        # A step counts as shallow only if every model call in it was.
        if full:
            self.step_kinds[step] = "full"
        else:
            self.step_kinds.setdefault(step, "shallow")


# --- depth ----------------------------------------------------------------------------------

def drop_skipped_control(control, skipped_outputs: int) -> None:
    """On a shallow step, discard the ControlNet residuals the skipped output blocks would have
    taken off the end of control["output"], so the blocks that run get their own ones (LDM hosts)."""
    if control is not None and "output" in control:
        for _ in range(min(skipped_outputs, len(control["output"]))):
            control["output"].pop()


def skip_count(unet: nn.Module) -> int:
    """How many skip connections (possible cache depths) a UNet has."""
    kind = unet_kind(unet)
    if kind == LDM:
        return len(unet.input_blocks)
    if kind == DIFFUSERS:
        return 1 + sum(len(b.resnets) + (1 if getattr(b, "downsamplers", None) else 0) for b in unet.down_blocks)
    raise SDAccelError(f"SD Accel DeepCache: expected an SD UNet (ComfyUI/LDM UNetModel or diffusers UNet2DConditionModel), found {type(unet).__name__}. DeepCache supports SD1.x, SD2.x and SDXL UNets.")


def check_depth(unet: nn.Module, config: DeepCacheConfig) -> None:
    n = skip_count(unet)
    if config.cache_depth >= n:
        raise SDAccelError(f"SD Accel DeepCache: cache_depth {config.cache_depth} is not a skip connection of this UNet, which has {n} (0..{n - 1}; SD1.x/SD2.x: 0..11, SDXL: 0..8). "
                           f"Pick a cache_depth between 0 and {n - 1}; the model was left unchanged.")


# --- diffusers UNet2DConditionModel ------------------------------------------------------------

_DIFFUSERS_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_DIFFUSERS_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


def _check_diffusers(unet: nn.Module) -> None:
    bad = [type(b).__name__ for b in unet.down_blocks if type(b).__name__ not in _DIFFUSERS_DOWN]
    bad += [type(b).__name__ for b in unet.up_blocks if type(b).__name__ not in _DIFFUSERS_UP]
    if bad:
        raise SDAccelError(f"SD Accel DeepCache: this diffusers UNet has blocks DeepCache does not know ({', '.join(sorted(set(bad)))}); expected the SD1.x/SD2.x/SDXL blocks "
                           f"{', '.join(_DIFFUSERS_DOWN + _DIFFUSERS_UP)}. Use an SD1.x, SD2.x or SDXL UNet.")
    if unet.config.addition_embed_type == "image_hint":
        raise SDAccelError("SD Accel DeepCache: UNets with addition_embed_type='image_hint' (Kandinsky) are not supported; expected an SD1.x/SD2.x/SDXL UNet.")
    n_up = sum(len(b.resnets) for b in unet.up_blocks)
    if n_up != skip_count(unet):
        raise SDAccelError(f"SD Accel DeepCache: the UNet's up path has {n_up} layers but its down path {skip_count(unet)} skip connections; expected them equal as in SD UNets.")


def _freeu_on(block) -> bool:
    return bool(getattr(block, "s1", None) and getattr(block, "s2", None) and getattr(block, "b1", None) and getattr(block, "b2", None))


def _diffusers_walk(unet, depth: int, cached, sample, timestep, encoder_hidden_states=None, class_labels=None, timestep_cond=None,
                    attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None, encoder_attention_mask=None):
    """UNet2DConditionModel.forward (diffusers 0.2x-0.4x, without ControlNet/adapter residuals or GLIGEN),
    walked layer by layer and cut at skip `depth`.

    Full (`cached` None): returns (output, the feature entering the up-layer that consumes skip
    `depth`). Shallow: runs conv_in and the down layers producing skips 0..depth, then the up
    layers from that one on, starting from `cached`; returns the output.
    """
    shallow = cached is not None
    n_skips = 1 + sum(len(b.resnets) + (1 if b.downsamplers is not None else 0) for b in unet.down_blocks)
    u0 = n_skips - 1 - depth  # the up-layer (counted over all up blocks) that consumes skip `depth`
    up_factor = 2 ** unet.num_upsamplers
    forward_upsample_size = any(s % up_factor != 0 for s in sample.shape[-2:])
    upsample_size = None
    if attention_mask is not None:
        attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if encoder_attention_mask is not None:
        encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0

    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    ehs = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    attn_kw = dict(encoder_hidden_states=ehs, cross_attention_kwargs=cross_attention_kwargs, attention_mask=attention_mask,
                   encoder_attention_mask=encoder_attention_mask, return_dict=False)

    h = unet.conv_in(sample)
    skips = [h]
    for block in unet.down_blocks:
        attns = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            if shallow and len(skips) > depth:
                break
            h = resnet(h, emb)
            if attns is not None:
                h = attns[j](h, **attn_kw)[0]
            skips.append(h)
        if block.downsamplers is not None and not (shallow and len(skips) > depth):
            for ds in block.downsamplers:
                h = ds(h)
            skips.append(h)
        if shallow and len(skips) > depth:
            break

    if shallow:
        h = cached
    elif unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=ehs, attention_mask=attention_mask,
                               cross_attention_kwargs=cross_attention_kwargs, encoder_attention_mask=encoder_attention_mask)
        else:
            h = unet.mid_block(h, emb)

    captured = None
    u = 0
    for i, block in enumerate(unet.up_blocks):
        n_res = len(block.resnets)
        first = max(0, u0 - u) if shallow else 0
        if first >= n_res:
            u += n_res
            continue
        consumed = n_res - first
        res = skips[-consumed:]
        skips = skips[:-consumed]
        if i < len(unet.up_blocks) - 1 and forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        freeu = _freeu_on(block)
        attns = getattr(block, "attentions", None)
        for j in range(first, n_res):
            if u + j == u0:
                if not shallow:
                    captured = h
                if freeu:  # FreeU scales h in place: keep the kept feature intact
                    h = h.clone()
            r = res[-1]
            res = res[:-1]
            if freeu:
                from diffusers.utils.torch_utils import apply_freeu

                h, r = apply_freeu(block.resolution_idx, h, r, s1=block.s1, s2=block.s2, b1=block.b1, b2=block.b2)
            h = torch.cat([h, r], dim=1)
            h = block.resnets[j](h, emb)
            if attns is not None:
                h = attns[j](h, **attn_kw)[0]
        if block.upsamplers is not None:
            for up in block.upsamplers:
                h = up(h, upsample_size)
        u += n_res

    if unet.conv_norm_out:
        h = unet.conv_norm_out(h)
        h = unet.conv_act(h)
    out = unet.conv_out(h)
    return out if shallow else (out, captured)


def _diffusers_full(unet, depth, *args, **kwargs):
    return _diffusers_walk(unet, depth, None, *args, **kwargs)


def _diffusers_shallow(unet, depth, cached, *args, **kwargs):
    return _diffusers_walk(unet, depth, cached, *args, **kwargs)


class DeepCacheUNet:
    """A diffusers UNet2DConditionModel with DeepCache: call it like the UNet.

    Each sampling run is bracketed by `begin(timesteps)` / `finish()` (or `with dc.run(timesteps):`)
    so the step of every call is known from its timestep. ControlNet / T2I-adapter residuals
    or GLIGEN turn caching off for the run (one log line): the UNet then runs in full.
    """

    def __init__(self, unet: nn.Module, config: DeepCacheConfig, compile=None):
        self.unet, self.config, self.compile_config = unet, config, compile
        self.state = DeepCacheState(config)
        full = functools.partial(_diffusers_full, unet, config.cache_depth)
        shallow = functools.partial(_diffusers_shallow, unet, config.cache_depth)
        if compile is not None:
            from .compile import compile as _compile

            full = _compile(unet, compile, entry=full, name=f"deepcache full d{config.cache_depth}")
            shallow = _compile(unet, compile, entry=shallow, name=f"deepcache shallow d{config.cache_depth}")
        self.full_path, self.shallow_path = full, shallow
        self._copy_kept = compile is not None and compile.mode in _CUDAGRAPH_MODES

    def begin(self, timesteps) -> "DeepCacheUNet":
        ts = timesteps.detach().flatten().float().cpu().tolist() if isinstance(timesteps, torch.Tensor) else [float(t) for t in timesteps]
        self.state.begin(ts)
        return self

    def finish(self) -> dict:
        return self.state.finish()

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
        st = self.state
        if not st.running:
            raise SDAccelError("SD Accel DeepCache: the step of this UNet call is unknown; expected `dc.begin(scheduler.timesteps)` (or `with dc.run(scheduler.timesteps):`) "
                               "before sampling. Call it once per image with the timesteps the scheduler will use.")
        kw = dict(class_labels=class_labels, timestep_cond=timestep_cond, attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs,
                  added_cond_kwargs=added_cond_kwargs, encoder_attention_mask=encoder_attention_mask)
        t = timestep if isinstance(timestep, torch.Tensor) else torch.tensor(float(timestep))
        step = st.step_of(float(t.flatten()[0]))
        extras = down_block_additional_residuals is not None or mid_block_additional_residual is not None or down_intrablock_additional_residuals is not None
        if extras or (cross_attention_kwargs or {}).get("gligen") is not None:
            st.disable("ControlNet/T2I-adapter residuals or GLIGEN inputs reach the UNet, and DeepCache does not replay them on shallow steps")
            st.mark(step, True)
            return self.unet(sample, timestep, encoder_hidden_states, class_labels=class_labels, timestep_cond=timestep_cond, attention_mask=attention_mask,
                             cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs,
                             down_block_additional_residuals=down_block_additional_residuals, mid_block_additional_residual=mid_block_additional_residual,
                             down_intrablock_additional_residuals=down_intrablock_additional_residuals, encoder_attention_mask=encoder_attention_mask, return_dict=return_dict)
        st.check_metadata(sample)
        keys = ("all",)
        cached = None if st.wants_full(step) else st.lookup(keys, sample.shape[0])
        if cached is None:
            out, kept = self.full_path(sample, timestep, encoder_hidden_states, **kw)
            st.store(keys, kept.clone() if self._copy_kept else kept, step)
        else:
            out = self.shallow_path(cached, sample, timestep, encoder_hidden_states, **kw)
        st.mark(step, cached is None)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


def deepcache(unet: nn.Module, config: DeepCacheConfig | None = None, *, compile=None) -> DeepCacheUNet:
    """DeepCache for a diffusers UNet2DConditionModel: a callable used in place of the UNet.

    The UNet itself is not modified. `compile` (a CompileConfig) compiles the full and the
    shallow paths, each once, with per-block fallback. ComfyUI models go through the node
    (`hosts/comfy_deepcache.apply_deepcache`).

    Example:
        >>> dc = deepcache(pipe.unet, DeepCacheConfig(cache_interval=3, cache_depth=0))
        >>> with dc.run(scheduler.timesteps):
        ...     for t in scheduler.timesteps:
        ...         eps = dc(latents_in, t, encoder_hidden_states=ctx).sample
    """
    config = config or DeepCacheConfig()
    if unet_kind(unet) != DIFFUSERS:
        raise SDAccelError(f"SD Accel DeepCache: deepcache() takes a diffusers UNet2DConditionModel, found {type(unet).__name__}. "
                           "For ComfyUI use the DeepCache (SD Accel) node.")
    _check_diffusers(unet)
    check_depth(unet, config)
    return DeepCacheUNet(unet, config, compile=compile)


__all__ = ["DeepCacheConfig", "DeepCacheState", "DeepCacheUNet", "deepcache", "full_steps", "skip_count", "check_depth", "SCHEDULES"]
