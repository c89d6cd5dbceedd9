from ..accel_core.deepcaching import SCHEDULES, DeepCacheConfig
from ..accel_core.hosts import comfy_deepcache as host, comfy_events


class SDAccelDeepCache:
    DESCRIPTION = ("DeepCache: runs the full UNet only every N steps; in between only its shallow blocks run, reusing the deep "
                   "features kept from the last full step (Ma et al., 2023). Higher intervals are faster and drift further from "
                   "the full result. Stacks with Compile UNet in either order; works with CFG, img2img, inpainting and ControlNet.")
    CATEGORY = "SD Accel"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the input model with DeepCache; the input model is unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to accelerate (SD1.x, SD2.x, SDXL)."}),
            "cache_interval": ("INT", {"default": 3, "min": 1, "max": 100, "tooltip": "Run the full UNet every N steps; 1 turns DeepCache off. 3 is the paper's default, 5 is faster and rougher."}),
            "cache_depth": ("INT", {"default": 0, "min": 0, "max": 11, "tooltip": "Which skip connection cuts off the cached deep branch, from the shallowest (0, fastest) down; SD1.x/SD2.x have 0-11, SDXL 0-8. Higher keeps more quality."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Fraction of the run's steps after which caching may start; earlier steps always run in full."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Fraction of the run's steps after which caching stops; later steps run in full (raise detail at the end by lowering it)."}),
            "schedule": (list(SCHEDULES), {"default": "uniform", "tooltip": "uniform: a full step every N steps. non-uniform: as many full steps, packed where the features change fastest (the paper's non-uniform variant)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model, cache_interval, cache_depth, start_percent, end_percent, schedule, unique_id=None):
        config = DeepCacheConfig(cache_interval=cache_interval, cache_depth=cache_depth, start_percent=start_percent, end_percent=end_percent, schedule=schedule)
        return (comfy_events.track(host.apply_deepcache(model, config), "deepcache", unique_id, source=model),)


NODE_CLASS_MAPPINGS = {"SDAccelDeepCache": SDAccelDeepCache}
NODE_DISPLAY_NAME_MAPPINGS = {"SDAccelDeepCache": "DeepCache (SD Accel)"}
