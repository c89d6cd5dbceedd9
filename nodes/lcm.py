import folder_paths

from ..accel_core.hosts import comfy_lcm as host
from ..accel_core.lcm import LcmConfig


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
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "LoRA strength; 1.0 is what it was distilled for (for Hyper-FLUX that is its recommended 0.125)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True, "tooltip": "Noise seed."}),
            "steps": ("INT", {"default": 4, "min": 1, "max": 50, "tooltip": "LCM needs few steps: 4 is the usual choice, 2-8 work."}),
            "cfg": ("FLOAT", {"default": 1.5, "min": 0.0, "max": 10.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Guidance scale; LCM wants 1.0-2.0. At 1.0 the negative pass is skipped (faster)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "1.0 for txt2img; lower keeps more of the input latent."}),
        }, "optional": {
            "lora_settings": ("BOOLEAN", {"default": True, "tooltip": "DiT few-step LoRAs: sample with the steps and CFG the LoRA was made for "
                                          "(its sampler, scheduler and flow shift always apply). Off: use steps and cfg above."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def sample(self, model, positive, negative, latent_image, lcm_lora_name, strength, seed, steps, cfg, denoise, lora_settings=True,
               unique_id=None):
        path = folder_paths.get_full_path_or_raise("loras", lcm_lora_name)
        config = LcmConfig(steps=steps, cfg=cfg, strength=strength, denoise=denoise)
        return (host.lcm_sample(model, positive, negative, latent_image, path, seed, config, unique_id, lora_settings),)


NODE_CLASS_MAPPINGS = {"SDAccelLCMLoRASampler": SDAccelLCMLoRASampler}
NODE_DISPLAY_NAME_MAPPINGS = {"SDAccelLCMLoRASampler": "LCM-LoRA Sampler (SD Accel)"}
