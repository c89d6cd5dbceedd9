"""ComfyUI host for LoRA hot-swap and the LCM-LoRA sampler.

Why not ComfyUI's own weight patches: `add_patches` gives the clone a new `patches_uuid`, so
the next load unpatches, moves the UNet to the offload device and back, and repatches
(comfyui-api.md §2.6); a compiled UNet may then also recompile. Hot-swap instead fuses the
deltas in place with `accel_core.lora`, keeping tensor identity.

Every clone of a MODEL shares one UNet, so *when* the deltas are in the weights is what keeps
clones apart:
- the node clones the model and records the LoRA set it wants as an attachment (an
  immutable `HotSwapSet`, shared by later clones; a chained node appends to it);
- ON_PRE_RUN (fired by `CFGGuider.outer_sample` after ComfyUI has loaded and patched the
  weights for this run) brings the sampling clone's UNet to exactly that set;
- ON_CLEANUP (in the same `finally` that ends every run, interrupted or not) restores the
  exact pre-run weights.
So the deltas exist only inside a run of a clone that asked for them: ComfyUI's backups and
its own LoRA patches (LoraLoader) are taken and restored on weights without our deltas, and a
plain clone sampled next sees its original weights. Module-level callbacks (never per-clone
closures) keep what dynamo may guard on identical across clones: swapping never recompiles.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from .. import events
from ..errors import SDAccelError
from ..lcm import DEEPCACHE_MIN_STEPS, LcmConfig, deepcache_helps
from ..log import logger
from ..lora import LoraConfig, LoraSpec, apply_loras, lora_state, read_lora
from .comfy import _check_model

LORA_KEY = "sd_accel.lora"
DEEPCACHE_KEY = "sd_accel.deepcache"
LCM_SAMPLER, LCM_SCHEDULER = "lcm", "sgm_uniform"

# unet -> the set the previous run used: the log says "swapped" only when it changes.
_last_run: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class HotSwapSet:
    """The LoRAs a clone wants fused while it samples (immutable: clones share it)."""

    specs: tuple[LoraSpec, ...]
    config: LoraConfig = LoraConfig()

    def plus(self, spec: LoraSpec) -> "HotSwapSet":
        return HotSwapSet(self.specs + (spec,), self.config)


def _callbacks_mp():
    import comfy.patcher_extension as pe

    return pe.CallbacksMP


def _on_pre_run(patcher):
    wanted = patcher.get_attachment(LORA_KEY)
    if not isinstance(wanted, HotSwapSet):
        return
    unet = patcher.model.diffusion_model
    report = apply_loras(unet, list(wanted.specs), wanted.config)
    key = tuple(wanted.specs)
    if _last_run.get(unet) != key:
        _last_run[unet] = key
        logger.info("SD Accel LoRA Hot-Swap: %s (no reload, no recompile).", report.summary())
        events.emit("lora_swap", loras=[{"name": n, "strength": s, "layers": k} for n, s, k in report.applied],
                    layers_changed=report.layers_changed, seconds=report.seconds)
    else:
        logger.debug("SD Accel LoRA Hot-Swap: %s", report.summary())


def _on_cleanup(patcher):
    unet = patcher.model.diffusion_model
    if lora_state(unet).active:
        wanted = patcher.get_attachment(LORA_KEY)
        apply_loras(unet, [], wanted.config if isinstance(wanted, HotSwapSet) else None)


def hotswap_set(model) -> HotSwapSet | None:
    s = model.get_attachment(LORA_KEY) if hasattr(model, "get_attachment") else None
    return s if isinstance(s, HotSwapSet) else None


def apply_hotswap(model, path: str, strength: float, config: LoraConfig | None = None):
    """Clone `model` and add the LoRA at `path` to the set the clone samples with.

    The file is read and matched against the UNet now, so a wrong file fails at the node
    with the model untouched; the weights change only while the clone samples.
    """
    unet = _check_model(model, "LoRA Hot-Swap")
    if unet is None:
        return model
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise SDAccelError(f"SD Accel LoRA Hot-Swap: strength must be a finite number, found {strength!r}. Use e.g. 1.0.")
    prev = hotswap_set(model)
    config = config or (prev.config if prev else LoraConfig())
    lf = read_lora(path)
    lora_state(unet).resolve(lf, config)  # raises SDAccelError (how many layers matched) for another architecture
    if strength == 0:
        return model  # like LoraLoader: strength 0 is the input model
    wanted = (prev or HotSwapSet((), config)).plus(LoraSpec(str(path), float(strength)))
    m = model.clone()
    m.set_attachments(LORA_KEY, wanted)
    cmp = _callbacks_mp()
    for kind, fn in ((cmp.ON_PRE_RUN, _on_pre_run), (cmp.ON_CLEANUP, _on_cleanup)):
        m.remove_callbacks_with_key(kind, LORA_KEY)
        m.add_callback_with_key(kind, LORA_KEY, fn)
    return m


# --- LCM ----------------------------------------------------------------------------------------------

def lcm_model(model, path: str, strength: float):
    """Clone with the LCM-LoRA hot-swapped in and LCM model sampling (ModelSamplingDiscrete "lcm")."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    m = apply_hotswap(model, path, strength)
    patched = ModelSamplingDiscrete().patch(m, "lcm", False)
    return patched[0] if isinstance(patched, tuple) else patched.result[0]


def _without_deepcache(model, steps: int):
    """A clone with DeepCache switched off when the run is too short for it to help (one log line)."""
    to = model.model_options.get("transformer_options", {})
    state = to.get(DEEPCACHE_KEY)
    if state is None:
        return model
    interval = getattr(getattr(state, "config", None), "cache_interval", 1)
    if deepcache_helps(steps, interval):
        return model
    from .comfy import _wrappers_mp

    m = model.clone()
    wmp = _wrappers_mp()
    for kind in (wmp.OUTER_SAMPLE, wmp.DIFFUSION_MODEL):
        m.remove_wrappers_with_key(kind, DEEPCACHE_KEY)
    m.model_options["transformer_options"].pop(DEEPCACHE_KEY, None)
    logger.info("SD Accel LCM: DeepCache is off for this %d-step run: each LCM step jumps far along the trajectory, so "
                "reused deep features would be stale (caching helps from %d steps at interval %d).",
                steps, max(DEEPCACHE_MIN_STEPS, 2 * interval), interval)
    return m


def lcm_sample(model, positive, negative, latent_image, path: str, seed: int, config: LcmConfig):
    """LCM-LoRA + LCM sampling through ComfyUI's own sampler (KSampler path); returns the LATENT dict."""
    import nodes

    m = _without_deepcache(lcm_model(model, path, config.strength), config.steps)
    out = nodes.common_ksampler(m, seed, config.steps, config.cfg, LCM_SAMPLER, LCM_SCHEDULER, positive, negative,
                                latent_image, denoise=config.denoise)
    return out[0]


__all__ = ["apply_hotswap", "hotswap_set", "HotSwapSet", "lcm_model", "lcm_sample", "LORA_KEY"]
