from ..accel_core.compiling import CompileConfig
from ..accel_core.options import comfy_inputs
from ..accel_core.hosts.comfy import compile as host, events as comfy_events


class SDAccelCompileUNet:
    DESCRIPTION = ("Compiles the model: SD UNets whole (torch.compile/inductor by default; onediff or stable-fast when installed), "
                   "DiT models (Flux, Chroma, Qwen-Image, Wan, Z-Image) block by block, one compiled block reused by all identical ones. "
                   "Blocks that do not convert stay eager and are named in the log. LoRAs applied after this node "
                   "update the compiled model in place without recompiling.")
    CATEGORY = "SD Accel"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the input model that runs compiled; the input model is unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to accelerate (SD1.x, SD2.x, SDXL, Flux, Chroma, Qwen-Image, Wan, Z-Image)."}),
            **comfy_inputs(CompileConfig, "backend", "mode", "dynamic", "fullgraph"),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model, backend, mode, dynamic, fullgraph, unique_id=None):
        m = host.apply_compile(model, CompileConfig(backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph))
        return (comfy_events.track(m, "compile", unique_id, source=model),)


NODE_CLASS_MAPPINGS = {"SDAccelCompileUNet": SDAccelCompileUNet}
NODE_DISPLAY_NAME_MAPPINGS = {"SDAccelCompileUNet": "Compile Model (SD Accel)"}
