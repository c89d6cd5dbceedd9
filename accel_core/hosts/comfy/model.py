"""ComfyUI adapter, the MODEL side: what every node checks and clones before it patches.

`check_model` probes the host's extension points and the model's family; `patchable_clone`
gives a clone whose weights SD Accel may change (a regular copy of a DynamicVRAM model).
Imports ComfyUI only inside functions.
"""
from __future__ import annotations

import inspect
import weakref

import torch

from ...errors import SDAccelError
from ...families import families, family_of
from ...log import logger
from .memory import regular_copy_fits


def wrappers_mp():
    import comfy.patcher_extension as pe

    return pe.WrappersMP


def callbacks_mp():
    import comfy.patcher_extension as pe

    return pe.CallbacksMP


_HOOKS = ("add_wrapper_with_key", "remove_wrappers_with_key", "add_callback_with_key", "remove_callbacks_with_key", "set_attachments", "get_attachment")
_WRAPPER_KINDS = ("OUTER_SAMPLE", "APPLY_MODEL", "DIFFUSION_MODEL")


def _missing_hooks(model) -> list[str]:
    """The host extension points SD Accel installs through that this MODEL / ComfyUI lacks."""
    try:
        import comfy.patcher_extension as pe
    except ImportError:
        return ["comfy.patcher_extension"]
    missing = [h for h in _HOOKS if not callable(getattr(model, h, None))]
    missing += [f"WrappersMP.{k}" for k in _WRAPPER_KINDS if not hasattr(getattr(pe, "WrappersMP", None), k)]
    return missing + [f"CallbacksMP.{k}" for k in ("ON_PRE_RUN", "ON_CLEANUP", "ON_DETACH") if not hasattr(getattr(pe, "CallbacksMP", None), k)]


# What a node needs of a model's family (a slot of families.Family that must be set); nodes not
# listed take any registered family.
_NEEDS = {"DeepCache": "host_walk", "LoRA Hot-Swap": "lora_keys", "LCM-LoRA Sampler": "lora_keys"}


def check_model(model, node: str):
    """The diffusion model inside a ComfyUI MODEL, or None (with a warning) when SD Accel cannot patch it."""
    if not hasattr(model, "clone") or not hasattr(model, "get_model_object"):
        raise SDAccelError(f"SD Accel {node}: expected a ComfyUI MODEL (ModelPatcher), found {type(model).__name__}. Connect the MODEL output of a loader.")
    missing = _missing_hooks(model)
    if missing:
        logger.warning("SD Accel %s: this ComfyUI lacks extension points SD Accel needs (%s); passing the model through unchanged. "
                       "Update ComfyUI or SD Accel.", node, ", ".join(missing))
        return None
    unet = model.get_model_object("diffusion_model")
    need = _NEEDS.get(node)
    fam = family_of(unet)
    if fam is None or (need and not getattr(fam, need)):
        able = "; ".join(f.display for f in families() if not need or getattr(f, need))
        logger.warning("SD Accel %s: %s is not a model this node knows (%s); passing the model through unchanged.", node, type(unet).__name__, able)
        return None
    return unet


# --- DynamicVRAM ------------------------------------------------------------------------------
# ComfyUI's DynamicVRAM patcher (on by default on NVIDIA since ~0.16) keeps the weights in
# read-only memory-mapped files and casts them per call: nothing may be written into them.
# Features that change weights (compile's NHWC conv weights, FP16 Cast's copy, hot-swap's
# fused deltas) run on a classic copy, rebuilt from the checkpoint file as ComfyUI's own
# TorchCompileModel does. One classic copy per dynamic model: all our clones of it share it, as
# clones share a model, so compiled code and fused weights carry over between nodes and runs.
class ClassicCopies:
    """The regular copy made for each DynamicVRAM model (its `get_clone_model_override()`), kept
    while the dynamic model lives (weakly keyed by it). One registry object: CLASSIC_COPIES."""

    def __init__(self):
        self._by_model: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()

    def get(self, dynamic_model):
        return self._by_model.get(dynamic_model)

    def remember(self, dynamic_model, override) -> None:
        self._by_model[dynamic_model] = override


CLASSIC_COPIES = ClassicCopies()


def _clone_params(model) -> frozenset:
    try:
        return frozenset(inspect.signature(model.clone).parameters)
    except (TypeError, ValueError):
        return frozenset()


def is_dynamic(model) -> bool:
    probe = getattr(model, "is_dynamic", None)
    return bool(probe()) if callable(probe) else False


def patchable_clone(model, node: str):
    """A clone of `model` whose weights SD Accel may change, or None (with one warning) when there is none."""
    if not is_dynamic(model):
        return model.clone()
    params = _clone_params(model)
    if "disable_dynamic" not in params:
        logger.warning("SD Accel %s: this MODEL uses DynamicVRAM and this ComfyUI offers no way to make a regular copy of it; "
                       "passing the model through unchanged. Start ComfyUI with --disable-dynamic-vram to use this node.", node)
        return None
    shared = "model_override" in params and callable(getattr(model, "get_clone_model_override", None))
    override = CLASSIC_COPIES.get(model.model) if shared else None
    if override is None and not regular_copy_fits(model, node):
        return None
    try:
        m = model.clone(disable_dynamic=True, model_override=override) if shared else model.clone(disable_dynamic=True)
    except RuntimeError as e:  # no cached_patcher_init: the model was not loaded from a file by a core loader
        logger.warning("SD Accel %s: this MODEL uses DynamicVRAM and ComfyUI cannot rebuild it as a regular model (%s); passing the "
                       "model through unchanged. Load it with a core loader (Load Checkpoint, Load Diffusion Model) or start "
                       "ComfyUI with --disable-dynamic-vram.", node, e)
        return None
    if shared and override is None:
        CLASSIC_COPIES.remember(model.model, m.get_clone_model_override())
        logger.info("SD Accel %s: DynamicVRAM model: made a regular copy from the checkpoint file (SD Accel's nodes share it).", node)
    return m


__all__ = ["wrappers_mp", "callbacks_mp", "check_model", "ClassicCopies", "CLASSIC_COPIES", "is_dynamic", "patchable_clone"]
