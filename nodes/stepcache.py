from ..accel_core.stepcache import CFG_MODES, MODES, StepCacheConfig
from ..accel_core.hosts.comfy import events as comfy_events, stepcache as host


class SDAccelStepCache:
    DESCRIPTION = ("Step Cache: on DiT models (Flux, Qwen-Image, Wan) skips the middle transformer blocks on some steps and "
                   "reuses (or extrapolates) the change they made at the last full step. Faster the more calls are cached, "
                   "further from the full result too. Stacks with Compile Model (each block stays compiled once) and LoRA Hot-Swap.")
    CATEGORY = "SD Accel"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the input model with the step cache; the input model is unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The DiT model to accelerate (Flux, Qwen-Image, Wan). For SD1.x/SDXL UNets use DeepCache."}),
            "mode": (list(MODES), {"default": "fixed", "tooltip": "fixed: a full step every N steps, predictable speed. adaptive: caches while the first blocks' output barely changes (speed depends on the image). forecast: the fixed schedule, extrapolating the cached change from the last two full steps: better quality at the same speed."}),
            "interval": ("INT", {"default": 3, "min": 1, "max": 20, "tooltip": "fixed/forecast: run every block every N steps; 1 turns the cache off. Higher is faster and drifts further."}),
            "front_blocks": ("INT", {"default": 1, "min": 0, "max": 64, "tooltip": "Blocks that always run first. More: better quality, less saved per cached step. adaptive needs >= 1."}),
            "back_blocks": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "Blocks that always run last (they refine details). More: better quality, less saved."}),
            "threshold": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 10.0, "step": 0.005, "tooltip": "adaptive: cache while the first blocks' output changed by less than this (relative) since the last full step. Higher: more cached steps, more drift; 0 never caches."}),
            "max_cached": ("INT", {"default": 3, "min": 0, "max": 50, "tooltip": "adaptive: at most this many cached steps in a row, a bound on drift; 0 turns the cache off."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Steps before this fraction of the run always run in full (the layout forms early)."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Steps after this fraction of the run always run in full (lower it to keep the last details exact)."}),
            "cfg": (list(CFG_MODES), {"default": "separate", "tooltip": "separate: cond and uncond keep their own caches (safe). shared: one cache; when ComfyUI runs cond and uncond apart, uncond reuses cond's cached change of the same step (faster, less exact). Identical when they run batched."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model, mode, interval, front_blocks, back_blocks, threshold, max_cached, start_percent, end_percent, cfg, unique_id=None):
        config = StepCacheConfig(mode=mode, interval=interval, front_blocks=front_blocks, back_blocks=back_blocks, threshold=threshold,
                                 max_cached=max_cached, start_percent=start_percent, end_percent=end_percent, cfg=cfg)
        return (comfy_events.track(host.apply_step_cache(model, config, owner=f"node {unique_id}" if unique_id else ""), "stepcache", unique_id, source=model),)


NODE_CLASS_MAPPINGS = {"SDAccelStepCache": SDAccelStepCache}
NODE_DISPLAY_NAME_MAPPINGS = {"SDAccelStepCache": "Step Cache (SD Accel)"}
