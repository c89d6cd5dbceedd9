from ..accel_core.casting import CastConfig
from ..accel_core.options import comfy_inputs
from ..accel_core.hosts.comfy import cast as host, events as comfy_events


class SDAccelFP16Cast:
    DESCRIPTION = ("Runs the UNet in fp16 or bf16 (auto: fp16 on CUDA; on the CPU bf16 with AMX, else fp32), or fp16 with fp8 matmuls on GPUs with "
                   "fp8 tensor cores, optionally channels_last, with the attention kernel of your choice. Works on a copy "
                   "of the UNet; the input model is unchanged.")
    CATEGORY = "SD Accel"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the input model with its own cast UNet.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to cast (SD1.x, SD2.x, SDXL)."}),
            **comfy_inputs(CastConfig),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model, dtype, channels_last, attention, unique_id=None):
        m = host.apply_cast(model, CastConfig(dtype=dtype, channels_last=channels_last, attention=attention))
        return (comfy_events.track(m, "cast", unique_id, source=model),)


NODE_CLASS_MAPPINGS = {"SDAccelFP16Cast": SDAccelFP16Cast}
NODE_DISPLAY_NAME_MAPPINGS = {"SDAccelFP16Cast": "FP16 Cast (SD Accel)"}
