from ..accel_core.backends import CHOICES
from ..accel_core.compile import MODES, CompileConfig
from ..accel_core.hosts import comfy as host, comfy_events


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
            "backend": (list(CHOICES), {"default": "auto", "tooltip": "auto picks the best installed: stable-fast, onediff, then inductor."}),
            "mode": (list(MODES), {"default": "reduce-overhead", "tooltip": "reduce-overhead adds CUDA graphs (the fastest; one graph per resolution and batch size); default: no CUDA graphs; max-autotune takes minutes to compile. On the CPU there are no CUDA graphs, so reduce-overhead equals default."}),
            "dynamic": ("BOOLEAN", {"default": False, "tooltip": "Compile for varying sizes at once (fewer recompiles, slightly slower kernels)."}),
            "fullgraph": ("BOOLEAN", {"default": False, "tooltip": "Require one graph per compiled unit; failures fall back block by block."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model, backend, mode, dynamic, fullgraph, unique_id=None):
        m = host.apply_compile(model, CompileConfig(backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph))
        return (comfy_events.track(m, "compile", unique_id, source=model),)


NODE_CLASS_MAPPINGS = {"SDAccelCompileUNet": SDAccelCompileUNet}
NODE_DISPLAY_NAME_MAPPINGS = {"SDAccelCompileUNet": "Compile Model (SD Accel)"}
