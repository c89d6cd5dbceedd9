import folder_paths

from ..accel_core.hosts.comfy import events as comfy_events, lora as host
from ..accel_core.lora import LoraSpec
from ..accel_core.options import comfy_input


class SDAccelLoRAHotSwap:
    DESCRIPTION = ("Applies a LoRA to the UNet by fusing it into the weights in place when this model samples, instead of "
                   "ComfyUI's reload-and-repatch. Changing the LoRA, its strength or the set of LoRAs needs no reload and no "
                   "recompile on a compiled UNet. Like ComfyUI's own LoRAs, it stays in the weights while this model stays "
                   "loaded (its next run writes nothing); the exact original weights come back before another model of the "
                   "same checkpoint samples, or when this one is unloaded. Chain nodes to stack LoRAs. UNet only (use "
                   "LoraLoader for the text encoder). The swap time is in the log.")
    CATEGORY = "SD Accel"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the input model that samples with this LoRA (plus any from earlier hot-swap nodes).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model (SD1.x, SD2.x, SDXL, Flux, Qwen-Image, Z-Image, Wan), compiled or not. It is not changed."}),
            "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "A LoRA .safetensors file from models/loras (kohya/A1111, diffusers/PEFT, XLabs, lightx2v keys)."}),
            "strength_model": comfy_input(LoraSpec, "strength"),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model, lora_name, strength_model, unique_id=None):
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        return (comfy_events.track(host.apply_hotswap(model, path, strength_model), "lora", unique_id, source=model),)


NODE_CLASS_MAPPINGS = {"SDAccelLoRAHotSwap": SDAccelLoRAHotSwap}
NODE_DISPLAY_NAME_MAPPINGS = {"SDAccelLoRAHotSwap": "LoRA Hot-Swap (SD Accel)"}
