"""ComfyUI host for Compile UNet: a keyed DIFFUSION_MODEL wrapper on a clone (DiT families with block
hooks: APPLY_MODEL, regional.py), never the incoming model.

Compiled artifacts live on the shared UNet (all clones share it): re-executed nodes, LoRA clones and
reloads reuse them instead of recompiling, and they go when the UNet goes. ComfyUI is imported in functions.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import replace

import torch

from ... import registry
from ...compiling import CompileConfig, CompiledUNet
from ...compile_cache import default_cache_dir
from ...families import family_of
from ...log import logger
from ...regional import is_regional
from .model import check_model, is_dynamic, patchable_clone, wrappers_mp
from .native import native_compile_state, step_aside

COMPILE_KEY = "sd_accel.compile"


def compiled_for(unet: torch.nn.Module, config: CompileConfig) -> CompiledUNet:
    # In the core's registry, on the shared UNet: every clone of the model reuses it (see accel_core/registry.py).
    return registry.compiled_for(unet, config)


def active_compile_config(transformer_options: dict) -> CompileConfig | None:
    """The CompileConfig of the Compile UNet wrapper in this sampling run (from its merged wrappers), if any."""
    wrappers, wmp = transformer_options.get("wrappers", {}), wrappers_mp()
    entries = [*wrappers.get(wmp.DIFFUSION_MODEL, {}).get(COMPILE_KEY, []), *wrappers.get(wmp.APPLY_MODEL, {}).get(COMPILE_KEY, [])]
    for fn in entries:  # _compile_wrapper(config, ...) or regional.regional_wrapper(family, config, ...)
        if isinstance(fn, functools.partial):
            return next((a for a in fn.args if isinstance(a, CompileConfig)), None)
    return None


def is_compile_wrapper(fn) -> bool:
    """Whether `fn` (an entry of a DIFFUSION_MODEL wrapper chain) is Compile UNet's."""
    return isinstance(fn, functools.partial) and fn.func is _compile_wrapper


def _options_of(unet, args, kwargs) -> dict | None:
    # The call's transformer_options, by name: its position differs per class (UNetModel 6th, Flux 8th).
    to = kwargs.get("transformer_options")
    if to is None:
        try:
            to = inspect.signature(unet._forward).bind_partial(*args, **kwargs).arguments.get("transformer_options")
        except TypeError:
            return None
    return to if isinstance(to, dict) else None


def _compile_wrapper(config: CompileConfig, executor, *args, **kwargs):
    # DIFFUSION_MODEL wrapper. The wrappers after this one (other packs', DeepCache's) run eager
    # as always, with the compiled body in place of the model's _forward: a new executor over the
    # rest of the same chain (WrapperExecutor.new_class_executor, ComfyUI's public constructor),
    # as ComfyUI's UNetModel.forward builds it. Nothing on the shared UNet is set, so clones
    # without Compile run it eager, and state_dict keys / LoRA key matching see plain modules.
    from comfy.patcher_extension import WrapperExecutor, get_all_wrappers

    unet = executor.class_obj
    to = _options_of(unet, args, kwargs)
    chain = get_all_wrappers(wrappers_mp().DIFFUSION_MODEL, to) if to is not None else []
    at = next((i for i, w in enumerate(chain) if is_compile_wrapper(w)), None)
    if at is None:  # called through another chain than the model's own: never seen in ComfyUI 0.3.64 .. 0.33
        logger.debug("SD Accel Compile UNet: this call's DIFFUSION_MODEL wrappers do not include Compile UNet's; it runs eager.")
        return executor(*args, **kwargs)
    return WrapperExecutor.new_class_executor(compiled_for(unet, config), unet, chain, at + 1).execute(*args, **kwargs)


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
    if not is_regional(fam, unet) and config.method != "_forward":
        logger.warning("SD Accel Compile UNet: %s has no _forward, the body ComfyUI runs inside its DIFFUSION_MODEL wrappers, "
                       "where the compiled code goes; passing the model through unchanged.", type(unet).__name__)
        return model
    m = patchable_clone(model, "Compile UNet")
    if m is None:
        return model
    # Weight patches applied later (LoraLoader) may replace parameters, as ComfyUI does on any model:
    # compiled code takes parameters as inputs (no recompile), and a switch between clones with other
    # weight patches moves the UNet off the GPU and back anyway (new storage; CUDA graphs re-record).
    # docs/comfy-internals.md, "Behaviour relied on".
    _attention_for_compile(m)
    wmp = wrappers_mp()
    for kind in (wmp.APPLY_MODEL, wmp.DIFFUSION_MODEL):
        m.remove_wrappers_with_key(kind, COMPILE_KEY)
    if is_regional(fam, unet):
        from .regional import regional_wrapper

        m.add_wrapper_with_key(wmp.APPLY_MODEL, COMPILE_KEY, functools.partial(regional_wrapper, fam, config))
        return m
    if dynamic:
        # The UNet is now the regular copy only SD Accel's clones use: its conv weights may be NHWC (a classic model's is the user's).
        config = replace(config, channels_last=True)
    m.add_wrapper_with_key(wmp.DIFFUSION_MODEL, COMPILE_KEY, functools.partial(_compile_wrapper, config))
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
