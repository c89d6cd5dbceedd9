from ..accel_core.deepcaching import DeepCacheConfig
from ..accel_core.options import comfy_inputs
from ..accel_core.hosts.comfy import deepcache as host, events as comfy_events


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
            **comfy_inputs(DeepCacheConfig),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model, cache_interval, cache_depth, start_percent, end_percent, schedule, unique_id=None):
        config = DeepCacheConfig(cache_interval=cache_interval, cache_depth=cache_depth, start_percent=start_percent, end_percent=end_percent, schedule=schedule)
        return (comfy_events.track(host.apply_deepcache(model, config), "deepcache", unique_id, source=model),)


NODE_CLASS_MAPPINGS = {"SDAccelDeepCache": SDAccelDeepCache}
NODE_DISPLAY_NAME_MAPPINGS = {"SDAccelDeepCache": "DeepCache (SD Accel)"}
