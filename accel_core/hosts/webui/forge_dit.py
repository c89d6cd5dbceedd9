"""Forge Neo's DiT models (Flux, Chroma, Qwen-Image, Wan, Z-Image): what of SD Accel runs on them, and how.

Neo's DiT classes (`backend/nn/flux.py`, `chroma.py`, `qwen.py`, `wan.py`, `lumina.py`) are
ComfyUI-derived: the families registry (accel_core/families) recognises them, and their
forwards offer each transformer block to `transformer_options["patches_replace"]["dit"]` as
ComfyUI's do (not Neo's NextDiT, as not ComfyUI's). So the core's regional compile runs
through Neo's UnetPatcher the way it runs through ComfyUI's: `DitWrapper`, a
`model_function_wrapper`, hands the model a copy of the call's transformer_options that routes
the blocks through the compiled callables. A family without block hooks (Z-Image) compiles its
forward whole with per-block fallback, through the same runner as the SD UNets. LoRA hot-swap
fuses through the family's LoRA name map as on a UNet. The cache controls run the Step Cache
(stepcache.py) through the same copy, its entries around the compiled blocks' as on ComfyUI.

What does not fit steps aside with a note that says what to do: the Step Cache where the blocks
have no hook (Z-Image's NextDiT, the June 2025 Forge's Flux) or the blocks asked for do not fit,
and the LCM-LoRA (LCM-LoRAs are SD1.x/SDXL UNet LoRAs).
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

from torch import nn

from ...casting import attention_context
from ...errors import SDAccelError
from ...families import Family
from ...regional import is_regional, with_blocks
from ...registry import regional_for
from .forge_wrapper import ForgeWrapper, host_compile
from .options import NO_LORA, WebuiOptions
from .stepcache import StepCachePass, stepcache_config


def takes_unet_features(family: Family | None) -> bool:
    """Whether DeepCache and the LCM-LoRA apply to a model of `family` (the UNets the webui walks with its hooks)."""
    return family is not None and family.host_walk is not None


def dit_options(family: Family, module: nn.Module, opts: WebuiOptions, notes: list[str]) -> tuple[WebuiOptions, StepCachePass | None]:
    """(`opts` without what a DiT model of `family` cannot take, the pass's Step Cache or None), with a note
    (what was asked, what was found, what to do) for each feature refused. The cache interval goes to the Step Cache."""
    steps = None
    if opts.deepcache_on:
        try:
            if not regional(family, module):
                raise SDAccelError(f"it runs {family.display}'s blocks through their block hooks, and this {type(module).__name__}'s forward "
                                   "has none (Forge Neo's Flux, Chroma, Qwen-Image and Wan have them; Z-Image's NextDiT does not); "
                                   "set Cache interval to 1")
            steps = StepCachePass(stepcache_config(opts), module)
        except SDAccelError as e:
            notes.append(f"Step Cache not applied: {str(e).removeprefix('SD Accel Step Cache: ')}")
        opts = replace(opts, deepcache_interval=1)  # not DeepCache's: the UNet cut
    if opts.lcm_on:
        notes.append(f"LCM-LoRA not applied: LCM-LoRAs are made for SD1.x/SDXL UNets, and this is {family.display}; for a few-step "
                     "LoRA of this model (Flux Turbo/Hyper, Qwen-Image-Lightning, Wan lightx2v) use LoRA hot-swap with the steps, "
                     "CFG and sampler its authors give")
        opts = replace(opts, lcm_lora=NO_LORA)
    return opts, steps


def regional(family: Family, module: nn.Module) -> bool:
    """Whether `module`'s blocks can go through the regional compile here: its family names block
    hooks and its class's methods (as resolved on the class) do look them up. Neo's do; the June
    2025 Forge's Flux has its own forward without them, and compiles whole instead."""
    if not is_regional(family, module):
        return False
    cls = type(module)
    names = {n for k in cls.__mro__ if k not in (nn.Module, object) for n in vars(k)}
    return any("patches_replace" in getattr(getattr(getattr(cls, n, None), "__code__", None), "co_consts", ()) for n in names)


class DitWrapper(ForgeWrapper):
    """Forge `model_function_wrapper` for a DiT model with block hooks: the blocks through the core's
    regional compile and Step Cache (`steps`, this pass's).

    The model's forward stays Neo's; only the call's transformer_options (a copy) gains the
    block entries, chained to any another script put there: the Step Cache's wrap that script's,
    the compiled blocks' wrap both (so the cache decides in eager Python and the block it runs is
    the compiled one, as on ComfyUI). LoRAs are fused at the first call, as on a UNet. Like
    ForgeWrapper, it never raises on its own account inside the sampler.
    """

    def __init__(self, plan, previous=None, *, family: Family, steps: StepCachePass | None = None, **kwargs):
        super().__init__(plan, previous, swap=False, **kwargs)
        self.family, self.steps = family, steps

    def __call__(self, apply_model, args: dict):
        unet, owner = self._unet(apply_model)
        if unet is None:
            self._warn("SD Accel: could not find the model behind this apply_model; this call runs without SD Accel.")
            return self._through(apply_model, args)
        self._runner_for(unet, args["input"].device.type)  # fuses this pass's LoRAs once
        other = host_compile(owner)
        if other is not None:
            self._warn(f"SD Accel: {other} appeared after SD Accel was applied; this call runs without SD Accel's compile and Step Cache.")
            return self._through(apply_model, args)
        rc = regional_for(unet, self.family, self.plan.compile) if self.plan.compile is not None else None
        if rc is not None or self.steps is not None:
            c = args["c"]
            to = c.get("transformer_options") or {}
            to = self.steps.route(to) if self.steps is not None else to
            args = {**args, "c": {**c, "transformer_options": with_blocks(to, rc) if rc is not None else to}}
        with attention_context(self.plan.attention), (rc.calling() if rc is not None else contextlib.nullcontext()):
            return self._through(apply_model, args)

    def finish(self) -> dict[str, list[dict]]:
        return {"stepcache": self.steps.finish() if self.steps is not None else []}


__all__ = ["DitWrapper", "dit_options", "takes_unet_features", "regional"]
