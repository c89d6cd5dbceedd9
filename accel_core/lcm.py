"""LCM-LoRA sampling: a consistency-distilled LoRA plus the LCM sampler, 4-8 steps at low CFG.

The LoRA goes through the hot-swap core (`accel_core.lora`), so it lands in place on a
compiled or cast UNet without recompiling and leaves the exact original weights behind.
Sampling follows the latent-consistency recipe as ComfyUI implements it (LoraLoader +
ModelSamplingDiscrete "lcm" + sampler "lcm" + scheduler "sgm_uniform"):

- the schedule keeps the 50 timesteps the LCM was distilled on (999, 979, ..., 19) and picks
  `steps` of them evenly in timestep space;
- each step predicts x0 with the consistency boundary conditions (sigma_data 0.5, timestep
  scaling 10), then re-noises to the next sigma with fresh noise.

`lcm_sample(unet_call, noise, cond, uncond, LcmConfig(...))` runs that loop over any UNet
callable (diffusers, webui); ComfyUI uses its own sampler objects (hosts/comfy/lcm.py).

Step caching (DeepCache) cannot help here: each LCM step jumps far along the trajectory, so
deep features from the previous step are stale. Below `DEEPCACHE_MIN_STEPS` it is switched off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import SDAccelError
from .options import check_declared, option

ORIGINAL_STEPS = 50  # LCM's distillation schedule (ModelSamplingDiscreteDistilled.original_timesteps)
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
DEEPCACHE_MIN_STEPS = 8


@dataclass(frozen=True)
class LcmConfig:
    """LCM sampling with an LCM-LoRA."""

    steps: int = option(4, "LCM needs few steps: 4 is the usual choice, 2-8 work.", label="LCM steps", min=1, max=ORIGINAL_STEPS, step=1)
    cfg: float = option(1.5, "Guidance scale; LCM wants 1.0-2.0. At 1.0 the negative pass is skipped (faster).", label="LCM CFG",
                        min=0.0, max=10.0, step=0.1, round=0.01)
    # 0..2: distilled at 1.0; a negative LCM-LoRA or one past 2 gives no usable few-step image.
    strength: float = option(1.0, "LCM-LoRA strength; 1.0 is what it was distilled for.", label="LCM-LoRA strength", min=0.0, max=2.0, step=0.01)
    denoise: float = option(1.0, "1.0 for txt2img; lower keeps more of the input latent.", label="Denoise", min=0.01, max=1.0, step=0.01)
    lora_settings: bool = option(True, "DiT few-step LoRAs: sample with the steps and CFG the LoRA was made for (its sampler, scheduler "
                                 "and flow shift always apply). Off: use steps and cfg above.", label="Few-step LoRA's own settings")

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= ORIGINAL_STEPS:
            raise SDAccelError(f"SD Accel LCM: steps must be a whole number from 1 to {ORIGINAL_STEPS}, found {self.steps!r}. "
                               "LCM-LoRA is made for 2-8 steps; use 4.")
        check_declared(self, "LCM")


def deepcache_helps(steps: int, cache_interval: int) -> bool:
    """Whether reusing deep UNet features can pay off in a run of `steps` LCM steps."""
    return steps >= max(DEEPCACHE_MIN_STEPS, 2 * cache_interval)


# --- schedule (SD1.x/SDXL discrete betas, LCM's distilled timesteps) ------------------------------

def _distilled_log_sigmas() -> torch.Tensor:
    # float32 like ComfyUI's ModelSamplingDiscrete buffers, so ties between timesteps resolve the same way
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    sigmas = (((1 - alphas) / alphas) ** 0.5).float()
    skip = 1000 // ORIGINAL_STEPS
    valid = torch.stack([sigmas[1000 - 1 - x * skip] for x in range(ORIGINAL_STEPS)][::-1])
    return valid.log().float()


def schedule(steps: int, denoise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) for `steps` LCM steps (sigmas end with 0), as ComfyUI's sgm_uniform on LCM sampling."""
    skip = 1000 // ORIGINAL_STEPS
    log_sigmas = _distilled_log_sigmas()

    def sigma(t):  # ModelSamplingDiscreteDistilled.sigma: log-linear between the distilled timesteps
        x = torch.clamp(((t.float() - (skip - 1)) / skip).float(), min=0, max=ORIGINAL_STEPS - 1)
        lo, hi, w = x.floor().long(), x.ceil().long(), x.frac()
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()

    def timestep(sig):  # ModelSamplingDiscreteDistilled.timestep: the nearest distilled one
        return (sig.log() - log_sigmas[:, None]).abs().argmin(dim=0) * skip + (skip - 1)

    total = steps if denoise >= 1.0 else int(steps / denoise)
    start, end = timestep(log_sigmas[-1:].exp()), timestep(log_sigmas[:1].exp())
    ts = torch.linspace(float(start), float(end), total + 1)[:-1]
    sig = torch.tensor([float(sigma(t)) for t in ts] + [0.0], dtype=torch.float32)[-(steps + 1):]
    return timestep(sig[:-1]).float(), sig


def boundary(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's consistency-model (c_skip, c_out) at timestep t."""
    st = t * TIMESTEP_SCALING
    c_skip = SIGMA_DATA ** 2 / (st ** 2 + SIGMA_DATA ** 2)
    c_out = st / (st ** 2 + SIGMA_DATA ** 2) ** 0.5
    return c_skip, c_out


def lcm_sample(unet_call: Callable, noise: torch.Tensor, config: LcmConfig, *, cond, uncond=None, seed: int = 0,
               latent: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """LCM sampling over `unet_call(x, t, context) -> eps`.

    `cond`/`uncond` are whatever `unet_call` takes as context (with cfg != 1 both run as one
    batch of 2: uncond first). Returns the final latent in fp32.
    """
    ts, sigmas = schedule(config.steps, config.denoise)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x0_init = latent.float() if latent is not None else torch.zeros_like(noise, dtype=torch.float32)
    s0 = float(sigmas[0])
    full = config.denoise >= 1.0
    x = x0_init + noise.float() * (math.sqrt(1 + s0 * s0) if full else s0)
    use_cfg = uncond is not None and not math.isclose(config.cfg, 1.0)
    dtype = dtype or noise.dtype
    for i in range(len(ts)):
        sigma, t = sigmas[i].to(x.device), ts[i].to(x.device)
        xin = (x / (sigma ** 2 + 1) ** 0.5).to(dtype)
        if use_cfg:
            eps = unet_call(torch.cat([xin, xin]), t.expand(2 * x.shape[0]), torch.cat([uncond, cond])).float()
            e_u, e_c = eps.chunk(2)
        else:
            e_c = unet_call(xin, t.expand(x.shape[0]), cond).float()
            e_u = e_c
        c_skip, c_out = boundary(t)

        def denoised(e):
            return c_out * (x - e * sigma) + c_skip * x

        d_c = denoised(e_c)
        x = d_c if not use_cfg else denoised(e_u) + config.cfg * (d_c - denoised(e_u))
        nxt = float(sigmas[i + 1])
        if nxt > 0:
            x = x + torch.randn(x.shape, generator=gen).to(x.device) * nxt
    return x


__all__ = ["LcmConfig", "lcm_sample", "schedule", "boundary", "deepcache_helps", "DEEPCACHE_MIN_STEPS"]
