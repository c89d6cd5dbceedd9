"""ComfyUI host for LoRA Hot-Swap: a clone that wants a LoRA set fused while it samples.

The node clones the model and records the set as an attachment (an immutable `HotSwapSet`,
shared by later clones; a chained node appends to it); keyed callbacks and an OUTER_SAMPLE
wrapper bring the UNet to that set at each run and restore the original weights when the
clone stops being the loaded one (comfy_lora_owner.py says when and why).

Why not ComfyUI's own weight patches: `add_patches` gives the clone a new `patches_uuid`, so
the next load unpatches, moves the UNet to the offload device and back, and repatches
(comfyui-api.md §2.6); a compiled UNet may then also recompile. Hot-swap instead fuses the
deltas in place with `accel_core.lora`, keeping tensor identity. The file's metadata goes where ComfyUI's
LoraLoader puts it (the "lora_metadata" attachment), so nodes that read it (LTX's GetICLoRAParameters) see it.
"""
from __future__ import annotations

import math

from ...errors import SDAccelError
from ...lora import LoraConfig, LoraSpec, lora_state, read_lora
from .model import callbacks_mp, check_model, patchable_clone, wrappers_mp
from .lora_owner import LORA_KEY, HotSwapSet, hotswap_set, on_cleanup, on_detach, on_pre_run, outer_sample

METADATA_KEY = "lora_metadata"  # ComfyUI's attachment for the last loaded LoRA's file metadata (comfy/sd.py load_lora_for_models)


def apply_hotswap(model, path: str, strength: float, config: LoraConfig | None = None):
    """Clone `model` and add the LoRA at `path` to the set the clone samples with.

    The file is read and matched against the UNet now, so a wrong file fails at the node
    with the model untouched; the weights change only when the clone samples.
    """
    unet = check_model(model, "LoRA Hot-Swap")
    if unet is None:
        return model
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise SDAccelError(f"SD Accel LoRA Hot-Swap: strength must be a finite number, found {strength!r}. Use e.g. 1.0.")
    prev = hotswap_set(model)
    config = config or (prev.config if prev else LoraConfig())
    lf = read_lora(path)
    if strength == 0:
        return model  # like LoraLoader: strength 0 is the input model
    m = patchable_clone(model, "LoRA Hot-Swap")  # fused deltas need weights we may write (DynamicVRAM: a regular copy)
    if m is None:
        return model
    lora_state(m.get_model_object("diffusion_model")).resolve(lf, config)  # raises SDAccelError (how many layers matched) for another architecture
    wanted = (prev or HotSwapSet((), config)).plus(LoraSpec(str(path), float(strength)))
    m.set_attachments(LORA_KEY, wanted)
    if lf.metadata:  # as LoraLoader does: GetICLoRAParameters reads an IC-LoRA's reference_downscale_factor from it
        m.set_attachments(METADATA_KEY, dict(lf.metadata))
    cmp = callbacks_mp()
    for kind, fn in ((cmp.ON_PRE_RUN, on_pre_run), (cmp.ON_CLEANUP, on_cleanup), (cmp.ON_DETACH, on_detach)):
        m.remove_callbacks_with_key(kind, LORA_KEY)
        m.add_callback_with_key(kind, LORA_KEY, fn)
    outer = wrappers_mp().OUTER_SAMPLE
    m.remove_wrappers_with_key(outer, LORA_KEY)
    m.add_wrapper_with_key(outer, LORA_KEY, outer_sample)
    return m


__all__ = ["apply_hotswap", "hotswap_set", "HotSwapSet", "LORA_KEY"]
