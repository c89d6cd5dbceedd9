"""Few-step LoRAs of the DiT families and the sampler settings each was distilled for.

The LCM-LoRA Sampler takes these beside SD's LCM-LoRAs: the user picks the LoRA, and the
settings come from which LoRA it is. Which one it is: the model family its layers fit (the LoRA
name map placed them: a Qwen-Image LoRA on a Qwen-Image model), then the publisher's name for it,
read from the file's metadata and, as a hint, its file name (the tensors of a 4-step and an
8-step distillation LoRA do not differ in kind). A file that is no known few-step LoRA for the
model's family is refused with the list of those that are.

Flow-matching models keep their own sampling (ComfyUI's model_sampling): a profile may set the
flow shift it was distilled with, never the SD LCM schedule.

Settings (the publishers' recommendations):
- Qwen-Image-Lightning (lightx2v): 4 or 8 steps, CFG 1, Euler; distilled with a constant
  exponential shift of log(3), i.e. flow shift 3.
- Wan 2.x lightx2v step/CFG-distill LoRAs (also Wan2.2-Lightning): 4 steps, CFG 1, shift 5; the
  distilled scheduler re-noises after every step, which is ComfyUI's "lcm" sampler on a flow model.
  Wan 2.2 A14B's come in high-/low-noise pairs for its two models, sampled 2 + 2 steps by two
  KSamplerAdvanced: one sampler over one model cannot do that, so the node samples the one model
  and warns with the recipe for the pair (LoRA Hot-Swap on each model).
- Hyper-FLUX.1-dev (ByteDance Hyper-SD): 8 or 16 steps at LoRA strength 0.125, CFG 1 (Flux guidance 3.5).
- FLUX.1-Turbo-Alpha (alimama-creative): 8 steps, CFG 1 (Flux guidance 3.5), strength 1.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import SDAccelError


@dataclass(frozen=True)
class FewStep:
    """A few-step LoRA and how to sample with it."""

    name: str
    family: str  # registry family name
    steps: int
    cfg: float
    sampler: str  # ComfyUI sampler name
    scheduler: str
    shift: float | None = None  # flow shift to sample with (None: the model's own)
    strength: float = 1.0  # the LoRA strength it was made for
    note: str = ""  # what the sampler warns about (a LoRA made for one model of a pair)


_STEPS = re.compile(r"(\d+)[\s_-]*steps?")


def _steps(text: str, allowed: tuple[int, ...], default: int) -> int:
    for m in _STEPS.finditer(text):
        n = int(m.group(1))
        if n in allowed:
            return n
    return default


def _qwen(text):
    if "lightning" in text:
        n = _steps(text, (4, 8), 8)
        return FewStep(f"Qwen-Image-Lightning {n}-step", "qwen_image", n, 1.0, "euler", "simple", shift=3.0)
    return None


# Wan 2.2 A14B's LoRAs come in pairs, one per model: "..._high_noise", "..._HIGH_fp16" (lower-cased here).
_WAN22_HALF = re.compile(r"(high|low)[\s_-]?noise|[_-](high|low)[_-]fp\d")


def _wan(text):
    if any(k in text for k in ("lightx2v", "stepdistill", "step_distill", "step-distill", "cfg_distill", "lightning")):
        half = _WAN22_HALF.search(text)
        if half is None:
            return FewStep("Wan lightx2v 4-step (step/CFG distill)", "wan", 4, 1.0, "lcm", "simple", shift=5.0)
        which = half.group(1) or half.group(2)
        steps = "the first 2 steps (0-2, return_with_leftover_noise)" if which == "high" else "the last 2 (2-4, add_noise off)"
        return FewStep(f"Wan 2.2 A14B lightx2v 4-step, {which}-noise half", "wan", 4, 1.0, "lcm", "simple", shift=5.0,
                       note=f"this LoRA is the {which}-noise half of a Wan 2.2 A14B pair: this node samples every step with this one "
                            f"model. For the pair, put LoRA Hot-Swap with each half on its model (ModelSamplingSD3 shift 5) and sample "
                            f"with two KSamplerAdvanced, 4 steps at CFG 1, the {which}-noise one running {steps}.")
    return None


def _flux(text):
    if "hyper" in text:
        n = _steps(text, (8, 16), 8)
        return FewStep(f"Hyper-FLUX.1-dev {n}-step", "flux", n, 1.0, "euler", "simple", strength=0.125)
    if "turbo" in text:
        return FewStep("FLUX.1-Turbo-Alpha 8-step", "flux", 8, 1.0, "euler", "simple")
    return None


# family -> (recogniser, what the error message lists)
_KNOWN = {
    "qwen_image": (_qwen, "Qwen-Image-Lightning 4-step / 8-step (lightx2v)"),
    "wan": (_wan, "the lightx2v step/CFG-distill LoRAs (lightx2v_..._cfg_step_distill_..., Wan2.2-Lightning)"),
    "flux": (_flux, "Hyper-FLUX.1-dev 8-step / 16-step, FLUX.1-Turbo-Alpha"),
}


def file_texts(path: str) -> str:
    """The file's name and the string values of its safetensors metadata, lower-case."""
    parts = [os.path.basename(path)]
    try:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            parts += [str(v) for v in (f.metadata() or {}).values() if isinstance(v, str) and len(v) < 400]
    except Exception:  # metadata is a hint; an unreadable header is reported by the LoRA reader
        pass
    return " ".join(parts).lower()


def recognise(family: str, family_display: str, path: str) -> FewStep:
    """The few-step LoRA at `path` for a model of `family`, or SDAccelError naming those SD Accel knows."""
    known = _KNOWN.get(family)
    hit = known[0](file_texts(path)) if known else None
    if hit is not None:
        return hit
    name = os.path.basename(path)
    if known is None:
        what = {"zimage": " (Z-Image-Turbo is a distilled checkpoint, not a LoRA: load it and sample 8 steps at CFG 1 in KSampler)"}
        raise SDAccelError(f"SD Accel LCM-LoRA Sampler: no few-step LoRA is known for {family_display} models{what.get(family, '')}; "
                           f"found {name!r}. Use it with LoRA Hot-Swap and KSampler, or use this node with a model that has one.")
    raise SDAccelError(f"SD Accel LCM-LoRA Sampler: {name!r} fits this {family_display} model but is not a few-step LoRA SD Accel "
                       f"knows. Expected one of: {known[1]} (recognised by the name in the file's metadata or its file name). "
                       "Pick one of those, or use LoRA Hot-Swap with KSampler and your own settings for other LoRAs. "
                       "The model was not changed.")


__all__ = ["FewStep", "recognise", "file_texts"]
