"""ComfyUI adapter: patches ModelPatcher clones with keyed wrappers, never the incoming model.

Imports ComfyUI only inside functions. Compiled artifacts live on the shared UNet (every
clone of a model shares it), so re-executed nodes, LoRA clones and reloads reuse them
instead of recompiling, and they go when the UNet goes.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import replace

import torch

from .. import registry
from ..compiling import CompileConfig, CompiledUNet
from ..compile_cache import default_cache_dir
from ..errors import SDAccelError
from ..families import families, family_of
from ..log import logger
from ..regional import is_regional
from .comfy_memory import regular_copy_fits
from .comfy_native import native_compile_state, step_aside

COMPILE_KEY = "sd_accel.compile"
_MISSING = object()


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
# Features that change weights (compile's in-place LoRA updates, FP16 Cast's copy, hot-swap's
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


def compiled_for(unet: torch.nn.Module, config: CompileConfig) -> CompiledUNet:
    # In the core's registry, on the shared UNet: every clone of the model reuses it (see accel_core/registry.py).
    return registry.compiled_for(unet, config)


def active_compile_config(transformer_options: dict) -> CompileConfig | None:
    """The CompileConfig of the Compile UNet wrapper in this sampling run (from its merged wrappers), if any."""
    entries = transformer_options.get("wrappers", {}).get(wrappers_mp().APPLY_MODEL, {}).get(COMPILE_KEY, [])
    for fn in entries:  # _compile_wrapper(config, ...) or comfy_regional.regional_wrapper(family, config, ...)
        if isinstance(fn, functools.partial):
            return next((a for a in fn.args if isinstance(a, CompileConfig)), None)
    return None


def _swap_attr(obj, name, value):
    prev = obj.__dict__.get(name, _MISSING)
    setattr(obj, name, value)
    return prev


def _restore_attr(obj, name, prev):
    if prev is _MISSING:
        obj.__dict__.pop(name, None)
    else:
        setattr(obj, name, prev)


def _compile_wrapper(config: CompileConfig, executor, *args, **kwargs):
    # APPLY_MODEL wrapper. Routes UNetModel._forward (the body *inside* its DIFFUSION_MODEL
    # wrapper chain) through the compiled callable for this call only, so other packs'
    # and our own DIFFUSION_MODEL wrappers (DeepCache) stay eager and decide outside
    # compiled code, and state_dict keys / LoRA key matching never see a compiled module.
    unet = executor.class_obj.diffusion_model
    compiled = compiled_for(unet, config)
    prev = _swap_attr(unet, config.method, compiled)
    try:
        return executor(*args, **kwargs)
    finally:
        _restore_attr(unet, config.method, prev)


def _sdpa_attention(func, *args, **kwargs):
    # transformer_options["optimized_attention_override"] of a compiled clone whose host picked an
    # attention that asks for free memory on every call (sub-quadratic, split: ComfyUI's choice on
    # the CPU). Traced, that probe is guarded on, so the frame recompiles whenever free memory
    # changes; PyTorch's SDPA computes the same attention and compiles cleanly.
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


def _host_attention_name() -> str:
    import comfy.ldm.modules.attention as attn

    return getattr(getattr(attn, "optimized_attention", None), "__name__", "attention")


def _host_attention_probes_memory() -> bool:
    import comfy.ldm.modules.attention as attn

    if not hasattr(attn, "wrap_attn") or not hasattr(attn, "attention_pytorch"):  # no per-model override in this ComfyUI
        return False
    chosen = getattr(attn, "optimized_attention", None)
    return any(chosen is getattr(attn, name, None) for name in ("attention_sub_quad", "attention_split"))


def apply_compile(model, config: CompileConfig):
    """Clone `model` and install a keyed compile wrapper on the clone.

    UNets (and DiT families without per-block hooks) compile their entry method whole, with
    per-block fallback; DiT families with `patches_replace["dit"]` hooks compile regionally.
    """
    unet = check_model(model, "Compile UNet")
    if unet is None or step_aside("compile", model, "Compile UNet"):  # ComfyUI's own graphs/compiler act on it
        return model
    fam = family_of(unet)
    # cache_dir: compiled graphs persist in ComfyUI's user folder, so the next start reuses them.
    config = replace(config, method=fam.entry_of(unet), cache_dir=config.cache_dir or default_cache_dir("comfy"))
    dynamic = is_dynamic(model)
    m = patchable_clone(model, "Compile UNet")
    if m is None:
        return model
    if is_regional(fam, unet):
        from .comfy_regional import regional_wrapper

        m.weight_inplace_update = True  # as below: CUDA graphs keep reading the same parameter storage
        _attention_for_compile(m)
        wmp = wrappers_mp()
        m.remove_wrappers_with_key(wmp.APPLY_MODEL, COMPILE_KEY)
        m.add_wrapper_with_key(wmp.APPLY_MODEL, COMPILE_KEY, functools.partial(regional_wrapper, fam, config))
        return m
    if dynamic:
        # The UNet is now the regular copy only SD Accel's clones use, so its conv weights may be
        # stored NHWC for the compiled convolutions; a classic model's UNet is the user's too.
        config = replace(config, channels_last=True)
    # LoRA patches applied later (ComfyUI's LoraLoader, our hot-swap) then copy into the
    # existing parameters, so CUDA graphs and other captured storage see the new weights.
    m.weight_inplace_update = True
    _attention_for_compile(m)
    wmp = wrappers_mp()
    m.remove_wrappers_with_key(wmp.APPLY_MODEL, COMPILE_KEY)
    m.add_wrapper_with_key(wmp.APPLY_MODEL, COMPILE_KEY, functools.partial(_compile_wrapper, config))
    return m


def _attention_for_compile(m):
    to = m.model_options.setdefault("transformer_options", {})
    if "optimized_attention_override" not in to and _host_attention_probes_memory():
        to["optimized_attention_override"] = _sdpa_attention  # a user's or FP16 Cast's choice stays
        logger.info("SD Accel Compile UNet: the compiled model uses PyTorch SDPA attention (ComfyUI's %s asks for free memory "
                    "on every call, which a compiled graph would recompile on).", _host_attention_name())


def compile_report(model) -> dict | None:
    """The compile report of the compiled UNet behind `model`, if any (for UIs and tests)."""
    unet = model.get_model_object("diffusion_model")
    config = active_compile_config({"wrappers": model.wrappers})
    if config is None:
        return None
    # Only this model's config: other clones of the same checkpoint may be compiled differently.
    reports = [cu.report for key, cu in registry.compiled_of(unet).items() if registry.key_config(key) == config]
    # DeepCache runs its own compiled paths; the plain one may then never have been called.
    report = next((r for r in reports if r.status != "pending"), reports[0] if reports else None)
    if report is None:
        return None
    return {**report.to_dict(), "comfy_native": native_compile_state(model).to_dict()}
