import folder_paths

from ..accel_core.hosts.comfy import lcm as host
from ..accel_core.lcm import LcmConfig
from ..accel_core.options import comfy_input, comfy_inputs


class SDAccelLCMLoRASampler:
    DESCRIPTION = ("Few-step sampling with an LCM-LoRA in one node: hot-swaps the LCM-LoRA into the UNet (no reload, no "
                   "recompile), switches the model to LCM sampling and runs the lcm sampler (sgm_uniform schedule). Works on "
                   "compiled and FP16-cast models; DeepCache is switched off for runs too short for it to help. On DiT models "
                   "it takes their few-step LoRAs (Qwen-Image-Lightning, Wan lightx2v, Hyper-FLUX, FLUX Turbo) and samples "
                   "with the settings each was made for (steps, CFG, sampler, scheduler, flow shift), keeping the model's "
                   "own flow sampling.")
    CATEGORY = "SD Accel"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base model (SD1.x or SDXL with an LCM-LoRA; Flux, Qwen-Image or Wan with their few-step LoRA), compiled or not. It is not changed."}),
            "positive": ("CONDITIONING", {"tooltip": "What the image should show."}),
            "negative": ("CONDITIONING", {"tooltip": "What to steer away from (only used when cfg is above 1)."}),
            "latent_image": ("LATENT", {"tooltip": "The latent to denoise: an empty latent for txt2img, an encoded image for img2img."}),
            "lcm_lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "The LCM-LoRA for this base model (e.g. lcm-lora-sdv1-5 or lcm-lora-sdxl), or a DiT few-step LoRA (Qwen-Image-Lightning 4/8-step, lightx2v Wan, Hyper-FLUX.1-dev, FLUX.1-Turbo-Alpha), from models/loras."}),
            "strength": comfy_input(LcmConfig, "strength"),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True, "tooltip": "Noise seed."}),
            **comfy_inputs(LcmConfig, "steps", "cfg", "denoise"),
        }, "optional": {
            "lora_settings": comfy_input(LcmConfig, "lora_settings"),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def __init__(self):
        self.clones = host.LcmClones()  # ComfyUI keeps one node object per graph node: a re-run reuses its clone

    def sample(self, model, positive, negative, latent_image, lcm_lora_name, strength, seed, steps, cfg, denoise, lora_settings=True,
               unique_id=None):
        path = folder_paths.get_full_path_or_raise("loras", lcm_lora_name)
        config = LcmConfig(steps=steps, cfg=cfg, strength=strength, denoise=denoise, lora_settings=lora_settings)
        return (host.lcm_sample(model, positive, negative, latent_image, path, seed, config, unique_id, self.clones, lora_settings),)


NODE_CLASS_MAPPINGS = {"SDAccelLCMLoRASampler": SDAccelLCMLoRASampler}
NODE_DISPLAY_NAME_MAPPINGS = {"SDAccelLCMLoRASampler": "LCM-LoRA Sampler (SD Accel)"}
