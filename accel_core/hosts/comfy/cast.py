"""ComfyUI host for FP16 Cast, through ComfyUI's public model API only.

The clone gets a UNet of its own in the requested dtype / memory format as an object patch
("diffusion_model"): ComfyUI swaps it in when it loads the clone and back out when it unloads
it, so the input and every other clone keep theirs. ComfyUI builds that UNet itself, from the
model's config as its loaders do (`model_config.get_model`), so it starts with none of the
load state of the shared one; it is filled with the exact unpatched weights (ComfyUI's
`get_key_patches`, LoRA Hot-Swap's `original_weights`), and ComfyUI's weight patches (a
LoraLoader before or after) apply to it at load. `set_model_compute_dtype(None)`: inputs go in
the copy's own dtype, and the new patches uuid makes ComfyUI reload whenever it switches
between this clone and one without the copy.

With dtype fp8 the copy's linear layers run fp8 matmuls (accel_core/fp8.py); LoRA Hot-Swap
re-quantizes the layers it writes, and an ON_PRE_RUN callback re-quantizes after ComfyUI's
own patches (applied at load).
"""
from __future__ import annotations

import functools

import torch

from ...casting import CastConfig, resolve_dtype
from ...errors import SDAccelError
from ...log import logger
from ...lora import original_weights
from .model import callbacks_mp, check_model, patchable_clone, wrappers_mp
from .attention import OVERRIDE_KEY, attention_override

CAST_KEY = "sd_accel.cast"
FP8_KEY = "sd_accel.fp8"
PREFIX = "diffusion_model."
_CAST_API = ("add_object_patch", "set_model_compute_dtype", "get_key_patches", "get_model_object")


def _channels_last_wrapper(executor, *args, **kwargs):
    # DIFFUSION_MODEL wrapper: feed the UNet NHWC activations to match its channels_last weights.
    x = args[0].contiguous(memory_format=torch.channels_last) if args and args[0].dim() == 4 else args[0]
    return executor(x, *args[1:], **kwargs)


def _fp8_pre_run(patcher):
    # ON_PRE_RUN: ComfyUI has loaded the clone and applied its weight patches to the copy.
    from ...fp8 import refresh

    refresh(patcher.get_model_object("diffusion_model"))


def _unpatched_state(m, unet) -> dict:
    """`unet`'s weights without any patch fused in: ComfyUI's originals of what it patched (when
    `unet` is the module ComfyUI holds now) and hot-swap's originals of what it fused."""
    sd = {k: v.detach() for k, v in unet.state_dict().items()}
    if m.model.diffusion_model is unet:  # get_key_patches reads the module the model holds now
        for key, entries in m.get_key_patches(PREFIX).items():
            weight, convert = entries[0][:2]
            sd[key[len(PREFIX):]] = convert(weight, inplace=False)
    sd.update(original_weights(unet))
    return sd


def cast_unet(m, unet, dtype: torch.dtype, channels_last: bool, node: str = "FP16 Cast"):
    """A new UNet of `m`'s architecture, built by ComfyUI from the model's config in `dtype`,
    holding `unet`'s unpatched weights (channels_last: conv weights stored NHWC)."""
    # A config of our own (set_inference_dtype changes it), made as ComfyUI's loaders make one: from the
    # unet_config. What a loader sets afterwards (quantized storage, custom ops) is for the weights we replace.
    model_config = m.model.model_config
    config = type(model_config)(dict(model_config.unet_config))
    config.set_inference_dtype(dtype, None)
    new = config.get_model({}, "", device=torch.device(m.offload_device)).diffusion_model
    try:
        new.load_state_dict(_unpatched_state(m, unet), strict=True)
    except RuntimeError as e:
        raise SDAccelError(f"SD Accel {node}: expected this model's config to rebuild its UNet ({type(unet).__name__}), "
                           f"but the weights do not fit it ({str(e).splitlines()[0]}). The model was left unchanged; "
                           "please report this model.") from e
    if channels_last:
        new.to(memory_format=torch.channels_last)
    return new.requires_grad_(False)


def apply_cast(model, config: CastConfig):
    """Clone `model`; give the clone its own UNet in the requested dtype / memory format and attention kernel."""
    unet = check_model(model, "FP16 Cast")
    if unet is None:
        return model
    missing = [h for h in _CAST_API if not callable(getattr(model, h, None))]
    if missing:
        logger.warning("SD Accel FP16 Cast: this ComfyUI's MODEL lacks %s; passing the model through unchanged. Update ComfyUI.", ", ".join(missing))
        return model
    device_type = torch.device(model.load_device).type
    if config.dtype == "fp8":
        from ...fp8 import check_fp8_device

        check_fp8_device(model.load_device, "SD Accel FP16 Cast")
    get_dtype = getattr(model.model, "get_dtype", None)  # the stored dtype; DynamicVRAM's lazy layers list no weights
    native = get_dtype() if callable(get_dtype) else next((q.dtype for q in unet.parameters() if q.is_floating_point()), None)
    dtype = resolve_dtype(config.dtype, device_type, native)
    copies = dtype != next(unet.parameters()).dtype or config.channels_last or config.dtype == "fp8"
    m = patchable_clone(model, "FP16 Cast") if copies else model.clone()
    if m is None:
        return model
    m.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = functools.partial(attention_override, config.attention)
    if copies:
        new = cast_unet(m, m.get_model_object("diffusion_model"), dtype, config.channels_last)
        if config.dtype == "fp8":
            from ...fp8 import to_fp8

            to_fp8(new)
        m.add_object_patch("diffusion_model", new)
        m.set_model_compute_dtype(None)  # compute in the copy's dtype; new patches uuid: a switch reloads
        if device_type == "cpu" and dtype == torch.float16:
            logger.warning("SD Accel FP16 Cast: fp16 on the CPU is slow in PyTorch; bf16 (or auto) is the fast choice there.")
    wmp = wrappers_mp()
    m.remove_wrappers_with_key(wmp.DIFFUSION_MODEL, CAST_KEY)
    if config.channels_last:
        m.add_wrapper_with_key(wmp.DIFFUSION_MODEL, CAST_KEY, _channels_last_wrapper)
    m.remove_callbacks_with_key(callbacks_mp().ON_PRE_RUN, FP8_KEY)
    if config.dtype == "fp8":
        m.add_callback_with_key(callbacks_mp().ON_PRE_RUN, FP8_KEY, _fp8_pre_run)
    return m


__all__ = ["apply_cast", "cast_unet", "CAST_KEY", "FP8_KEY"]
