"""ComfyUI host for FP16 Cast: a clone whose UNet is a copy in the requested dtype / memory format,
with the attention kernel chosen per model (transformer_options["optimized_attention_override"]).
With dtype fp8 the copy's linear layers run fp8 matmuls (accel_core/fp8.py); an APPLY_MODEL
wrapper re-quantizes them whenever ComfyUI's patches or LoRA Hot-Swap changed the weights.

The copy is made from the exact unpatched weights (ComfyUI's backups and hot-swap's kept
originals), so LoRAs applied to the input stay its own; the input model is never touched.
"""
from __future__ import annotations

import copy
import functools
import uuid

import torch

from ..cast import CastConfig, attention_context, cast_copy, resolve_dtype
from ..log import logger
from .comfy import check_model, wrappers_mp, patchable_clone

CAST_KEY = "sd_accel.cast"
FP8_KEY = "sd_accel.fp8"


def _attention_override(attention: str, func, *args, **kwargs):
    # transformer_options["optimized_attention_override"] (ComfyUI >= 0.3.6x): called instead of
    # the attention function the host picked at start-up, for this model only.
    from comfy.ldm.modules.attention import attention_pytorch

    if attention == "auto":
        return attention_pytorch(*args, **kwargs)
    # ComfyUI's attention_pytorch opens its own sdpa_kernel(priority) around SDPA on CUDA, which
    # would undo the choice: call SDPA here, shaped as attention_pytorch shapes it.
    return _sdpa(attention, *args, **kwargs)


def _sdpa(attention, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, inner = q.shape
        dim_head = inner // heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
        mask = mask.unsqueeze(1) if mask.ndim == 3 else mask
    extra = {"scale": kwargs["scale"]} if "scale" in kwargs else {}
    with attention_context(attention):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, **extra)
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(b, -1, heads * dim_head)
    return out


def _weights_token(base, unet):
    # Changes whenever the copy's half-precision weights do: ComfyUI writes its patches at load
    # (and records their uuid on the model); LoRA Hot-Swap records what it fused.
    from ..lora import lora_state

    return (getattr(base, "current_weight_patches_uuid", None), lora_state(unet).applied)


def _fp8_refresh_wrapper(executor, *args, **kwargs):
    # APPLY_MODEL wrapper, outside any compiled region: cheap when nothing changed.
    from .. import fp8

    base = executor.class_obj
    fp8.refresh(base.diffusion_model, _weights_token(base, base.diffusion_model))
    return executor(*args, **kwargs)


def _channels_last_wrapper(executor, *args, **kwargs):
    # DIFFUSION_MODEL wrapper: feed the UNet NHWC activations to match its channels_last weights.
    x = args[0].contiguous(memory_format=torch.channels_last) if args and args[0].dim() == 4 else args[0]
    return executor(x, *args[1:], **kwargs)


def _unpatched_weights(model, unet) -> dict:
    """The UNet's weights without any LoRA patches currently applied to the shared module: the
    exact copies LoRA Hot-Swap keeps while its deltas stay fused, and ComfyUI's own backups."""
    from ..lora import lora_state

    state = lora_state(unet)
    with state.lock:
        out = dict(state.originals)
    for key, b in getattr(model, "backup", {}).items():
        if key.startswith("diffusion_model."):
            out[key[len("diffusion_model."):]] = b.weight
    return out


def _reset_load_markers(module):
    # Markers ComfyUI keeps on the (shared) module about what it loaded; a fresh copy has loaded nothing.
    for name, value in (("model_loaded_weight_memory", 0), ("lowvram_patch_counter", 0), ("model_lowvram", False),
                        ("current_weight_patches_uuid", None), ("model_offload_buffer_memory", 0)):
        if hasattr(module, name):
            setattr(module, name, value)
    for sub in module.modules():
        if getattr(sub, "comfy_patched_weights", False):
            sub.comfy_patched_weights = False
        if hasattr(sub, "weight_function"):
            sub.weight_function = []
            sub.bias_function = []
        if hasattr(sub, "prev_comfy_cast_weights"):
            sub.comfy_cast_weights = sub.prev_comfy_cast_weights
            del sub.prev_comfy_cast_weights


def apply_cast(model, config: CastConfig):
    """Clone `model`; give the clone its own UNet copy in the requested dtype / memory format and attention kernel."""
    unet = check_model(model, "FP16 Cast")
    if unet is None:
        return model
    import comfy.model_management as mm

    device_type = torch.device(model.load_device).type
    if config.dtype == "fp8":
        from ..fp8 import check_fp8_device

        check_fp8_device(model.load_device, "SD Accel FP16 Cast")
    dtype = resolve_dtype(config.dtype, device_type)
    copies = dtype != next(unet.parameters()).dtype or config.channels_last or config.dtype == "fp8"
    m = patchable_clone(model, "FP16 Cast") if copies else model.clone()
    if m is None:
        return model
    wmp = wrappers_mp()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = functools.partial(_attention_override, config.attention)
    if copies:
        base = m.model
        unet = base.diffusion_model
        new_unet = cast_copy(unet, dtype, config.channels_last, source=_unpatched_weights(m, unet))
        new_unet.dtype = dtype
        if config.dtype == "fp8":
            from ..fp8 import to_fp8

            to_fp8(new_unet)
        new_base = copy.copy(base)
        for d in ("_modules", "_parameters", "_buffers"):
            setattr(new_base, d, dict(getattr(base, d)))
        new_base.diffusion_model = new_unet
        new_base.manual_cast_dtype = None  # the weights now are the compute dtype
        _reset_load_markers(new_base)
        new_base.device = model.offload_device
        m.model = new_base
        m.backup, m.object_patches_backup = {}, {}
        for name, empty in (("backup_buffers", {}), ("pinned", set())):  # ComfyUI >= 0.1x keeps these per model too
            if hasattr(m, name):
                setattr(m, name, empty)
        m.size = 0
        m.patches_uuid = uuid.uuid4()
        if "manual_cast_dtype" in m.object_patches:
            m.object_patches.pop("manual_cast_dtype")
        m.force_cast_weights = False
        if mm.get_torch_device().type == "cpu" and dtype == torch.float16:
            logger.warning("SD Accel FP16 Cast: fp16 on the CPU is slow in PyTorch; bf16 (or auto) is the fast choice there.")
    m.remove_wrappers_with_key(wmp.DIFFUSION_MODEL, CAST_KEY)
    if config.channels_last:
        m.add_wrapper_with_key(wmp.DIFFUSION_MODEL, CAST_KEY, _channels_last_wrapper)
    m.remove_wrappers_with_key(wmp.APPLY_MODEL, FP8_KEY)
    if config.dtype == "fp8":
        m.add_wrapper_with_key(wmp.APPLY_MODEL, FP8_KEY, _fp8_refresh_wrapper)
    return m
