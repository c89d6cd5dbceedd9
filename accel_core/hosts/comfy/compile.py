"""ComfyUI host for Compile UNet: a keyed APPLY_MODEL wrapper on a clone, never the incoming model.

Compiled artifacts live on the shared UNet (all clones share it): re-executed nodes, LoRA clones and
reloads reuse them instead of recompiling, and they go when the UNet goes. ComfyUI is imported in functions.
"""
from __future__ import annotations

import functools
from dataclasses import replace

import torch

from ... import registry
from ...compiling import CompileConfig, CompiledUNet
from ...compile_cache import default_cache_dir
from ...families import family_of
from ...log import logger
from ...regional import is_regional
from .blockhooks import install_block_hooks
from .model import check_model, is_dynamic, patchable_clone, wrappers_mp
from .native import native_compile_state, step_aside

COMPILE_KEY = "sd_accel.compile"
_MISSING = object()


def compiled_for(unet: torch.nn.Module, config: CompileConfig) -> CompiledUNet:
    # In the core's registry, on the shared UNet: every clone of the model reuses it (see accel_core/registry.py).
    return registry.compiled_for(unet, config)


def active_compile_config(transformer_options: dict) -> CompileConfig | None:
    """The CompileConfig of the Compile UNet wrapper in this sampling run (from its merged wrappers), if any."""
    entries = transformer_options.get("wrappers", {}).get(wrappers_mp().APPLY_MODEL, {}).get(COMPILE_KEY, [])
    for fn in entries:  # _compile_wrapper(config, ...) or regional.regional_wrapper(family, config, ...)
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
    """Clone `model` and install a keyed compile wrapper on the clone. UNets compile their entry method
    whole, with per-block fallback; DiT families regionally, through `patches_replace["dit"]` hooks."""
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
    if is_regional(fam, unet, hooks=True):
        from .regional import regional_wrapper

        m.weight_inplace_update = True  # as below: CUDA graphs keep reading the same parameter storage
        install_block_hooks(m, fam, unet)  # NextDiT: the block hook its forward lacks (blockhooks.py)
        _attention_for_compile(m)
        wmp = wrappers_mp()
        m.remove_wrappers_with_key(wmp.APPLY_MODEL, COMPILE_KEY)
        m.add_wrapper_with_key(wmp.APPLY_MODEL, COMPILE_KEY, functools.partial(regional_wrapper, fam, config))
        return m
    if dynamic:
        # The UNet is now the regular copy only SD Accel's clones use: its conv weights may be NHWC (a classic model's is the user's).
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
