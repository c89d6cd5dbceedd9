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
from .attention import compile_attention
from .blockhooks import install_block_hooks
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


@functools.lru_cache(maxsize=None)
def _options_at(cls) -> int | None:
    # Where a class's _forward takes transformer_options positionally (UNetModel: 5, Flux: 7), once per class.
    names = [n for n in inspect.signature(cls._forward).parameters][1:]  # without self
    return names.index("transformer_options") if "transformer_options" in names else None


def _options_of(unet, args, kwargs) -> dict | None:
    at = _options_at(type(unet))
    to = args[at] if at is not None and len(args) > at else kwargs.get("transformer_options")
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
    if at is None:  # called through another chain than the model's own (not seen in ComfyUI 0.3.64 .. 0.33): eager
        return executor(*args, **kwargs)
    return WrapperExecutor.new_class_executor(compiled_for(unet, config), unet, chain, at + 1).execute(*args, **kwargs)


def patches_would_retrace(unet) -> bool:
    """Whether a weight patch loaded after Compile (LoraLoader) must be copied into the parameter in place.

    ComfyUI puts `Parameter(requires_grad=False)` of an inference tensor (its executor runs under
    torch.inference_mode) where it patches a weight; compiled code reads parameters as inputs and
    guards their properties, not their identity. Where the model's differ (ComfyUI 0.3.64 / 0.8.0
    build models with requires_grad; a script builds them outside inference mode), the first LoRA
    after Compile would compile again."""
    return any(p.requires_grad or not p.is_inference() for p in unet.parameters())


def apply_compile(model, config: CompileConfig):
    """Clone `model` and install a keyed compile wrapper on the clone. UNets compile their entry method
    whole, with per-block fallback; DiT families regionally, through `patches_replace["dit"]` hooks."""
    unet = check_model(model, "Compile UNet")
    if unet is None or step_aside("compile", model, "Compile UNet"):  # ComfyUI's own graphs/compiler act on it
        return model
    fam = family_of(unet)
    # cache_dir: compiled graphs persist in ComfyUI's user folder, so the next start reuses them.
    config = replace(config, method=fam.entry_of(unet), cache_dir=config.cache_dir or default_cache_dir("comfy"))
    dynamic, regional = is_dynamic(model), is_regional(fam, unet, hooks=True)
    if not regional and config.method != "_forward":
        logger.warning("SD Accel Compile UNet: %s has no _forward, the body ComfyUI runs inside its DIFFUSION_MODEL wrappers, "
                       "where the compiled code goes; passing the model through unchanged.", type(unet).__name__)
        return model
    m = patchable_clone(model, "Compile UNet")
    if m is None:
        return model
    if patches_would_retrace(m.get_model_object("diffusion_model")):  # the regular copy's, on DynamicVRAM
        m.weight_inplace_update = True  # the one write left: docs/comfy-internals.md
    compile_attention(m)
    wmp = wrappers_mp()
    for kind in (wmp.APPLY_MODEL, wmp.DIFFUSION_MODEL):
        m.remove_wrappers_with_key(kind, COMPILE_KEY)
    if regional:
        from .regional import regional_wrapper

        install_block_hooks(m, fam, unet)  # NextDiT: the block hook its forward lacks (blockhooks.py)
        m.add_wrapper_with_key(wmp.APPLY_MODEL, COMPILE_KEY, functools.partial(regional_wrapper, fam, config))
        return m
    if dynamic:
        # The UNet is now the regular copy only SD Accel's clones use: its conv weights may be NHWC (a classic model's is the user's).
        config = replace(config, channels_last=True)
    m.add_wrapper_with_key(wmp.DIFFUSION_MODEL, COMPILE_KEY, functools.partial(_compile_wrapper, config))
    return m


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
