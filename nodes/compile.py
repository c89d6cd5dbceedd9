from ..accel_core.compile import CompileConfig
from ..accel_core.options import comfy_inputs
from ..accel_core.hosts import comfy as host, comfy_events


class SDAccelCompileUNet:
    DESCRIPTION = ("Compiles the UNet (torch.compile/inductor by default; onediff or stable-fast when installed). "
                   "Blocks the backend cannot convert stay eager and are named in the log. LoRAs applied after this node "
                   "update the compiled model in place without recompiling.")
    CATEGORY = "SD Accel"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the input model whose UNet runs compiled; the input model is unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to accelerate (SD1.x, SD2.x, SDXL)."}),
            **comfy_inputs(CompileConfig, "backend", "mode", "dynamic", "fullgraph"),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model, backend, mode, dynamic, fullgraph, unique_id=None):
        m = host.apply_compile(model, CompileConfig(backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph))
        return (comfy_events.track(m, "compile", unique_id, source=model),)


NODE_CLASS_MAPPINGS = {"SDAccelCompileUNet": SDAccelCompileUNet}
NODE_DISPLAY_NAME_MAPPINGS = {"SDAccelCompileUNet": "Compile UNet (SD Accel)"}
