"""Z-Image's LoRA name map (ComfyUI's Lumina 2 / NextDiT layout).

ComfyUI fuses q/k/v into one `attention.qkv` weight; diffusers LoRAs name `attention.to_q/k/v`,
slices of it, as ComfyUI's `comfy.utils.z_image_to_diffusers` maps them. The other diffusers
names differ from ComfyUI's in a few places (`to_out.0` -> `out`, `norm_q` -> `q_norm`, the
`all_x_embedder.2-1` / `all_final_layer.2-1` of diffusers' multi-patch-size modules).
"""
from __future__ import annotations

_BLOCK = {"attention.to_out.0": "attention.out", "attention.norm_q": "attention.q_norm",
          "attention.norm_k": "attention.k_norm"}
_BASIC = {"all_final_layer.2-1.linear": "final_layer.linear",
          "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
          "all_x_embedder.2-1": "x_embedder"}


def lora_aliases(dit):
    """(alias, parameter name, offset) for every non-native name a Z-Image LoRA may use."""
    for group in ("layers", "context_refiner", "noise_refiner"):
        for i, block in enumerate(getattr(dit, group, None) or ()):
            p = f"{group}.{i}"
            rows = block.attention.qkv.weight.shape[0]
            q = block.attention.qkv.weight.shape[1]  # q is dim wide; k and v share the rest
            kv = (rows - q) // 2
            for name, start, size in (("to_q", 0, q), ("to_k", q, kv), ("to_v", q + kv, kv)):
                yield f"{p}.attention.{name}", f"{p}.attention.qkv.weight", (0, start, size)
            for a, b in _BLOCK.items():
                yield f"{p}.{a}", f"{p}.{b}.weight", None
    for a, b in _BASIC.items():
        yield a, f"{b}.weight", None


def lora_keys(module) -> dict:
    """The registry's LoRA name map slot: {alias: (parameter name, offset)}; a module's own names come on top."""
    return {alias: (pname, offset) for alias, pname, offset in lora_aliases(module)}
