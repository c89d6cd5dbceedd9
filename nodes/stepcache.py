from ..accel_core.options import comfy_inputs
from ..accel_core.stepcache import StepCacheConfig
from ..accel_core.hosts.comfy import events as comfy_events, stepcache as host


class SDAccelStepCache:
    DESCRIPTION = ("Step Cache: on DiT models (Flux, Qwen-Image, Z-Image, Wan) skips the middle transformer blocks on some steps and "
                   "reuses (or extrapolates) the change they made at the last full step; on SD UNets it cuts at a skip connection "
                   "as DeepCache does (fixed or forecast). Faster the more calls are cached, further from the full result too. "
                   "Stacks with Compile Model (each block stays compiled once) and LoRA Hot-Swap.")
    CATEGORY = "SD Accel"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the input model with the step cache; the input model is unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to accelerate: Flux, Qwen-Image, Z-Image, Wan; or an SD1.x/SD2.x/SDXL UNet, cut at skip front_blocks - 1 (DeepCache's depth; back_blocks 0)."}),
            **comfy_inputs(StepCacheConfig),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model, mode, interval, front_blocks, back_blocks, threshold, max_cached, start_percent, end_percent, cfg,
              schedule="rolling", unique_id=None):  # schedule came later: workflows saved before it get the old behaviour
        config = StepCacheConfig(mode=mode, interval=interval, front_blocks=front_blocks, back_blocks=back_blocks, threshold=threshold,
                                 max_cached=max_cached, start_percent=start_percent, end_percent=end_percent, cfg=cfg, schedule=schedule)
        return (comfy_events.track(host.apply_step_cache(model, config, owner=f"node {unique_id}" if unique_id else ""), "stepcache", unique_id, source=model),)


NODE_CLASS_MAPPINGS = {"SDAccelStepCache": SDAccelStepCache}
NODE_DISPLAY_NAME_MAPPINGS = {"SDAccelStepCache": "Step Cache (SD Accel)"}
