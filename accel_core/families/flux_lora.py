"""Flux's LoRA name map (Flux.1 dev/schnell, Flux.2, Chroma: ComfyUI's `comfy.ldm.flux` layout).

ComfyUI fuses q/k/v into one `qkv` weight per stream, and a single block's q/k/v and MLP input
into one `linear1`. Diffusers/PEFT LoRAs name the unfused layers (`transformer_blocks.0.attn.to_q`),
so those names point at slices `(dim, start, size)` of the fused weight, as ComfyUI's
`comfy.utils.flux_to_diffusers` maps them. XLabs LoRAs (`double_blocks.0.processor.qkv_lora1`)
name the fused layers under other names, as ComfyUI's `lora_convert.convert_uso_lora` reads them.
kohya (`lora_unet_double_blocks_0_img_attn_qkv`) and ComfyUI's own names are the module paths.
"""
from __future__ import annotations

_DOUBLE = {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
           "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
           "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2", "ff.linear_in": "img_mlp.0",
           "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
           "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
           "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_DOUBLE_XLABS = {"processor.qkv_lora1": "img_attn.qkv", "processor.qkv_lora2": "txt_attn.qkv",
                 "processor.proj_lora1": "img_attn.proj", "processor.proj_lora2": "txt_attn.proj"}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2", "attn.norm_q": "norm.query_norm",
           "attn.norm_k": "norm.key_norm", "attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2",
           "processor.proj_lora": "linear2", "processor.proj": "linear2"}
_BASIC = {"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in",
          "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
          "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
          "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
          "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
          "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
          "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}


def _w(flux, path: str) -> str:
    """The patchable parameter of module `path`: `weight`, or `scale` (the RMSNorms of ComfyUI before ~0.4)."""
    try:
        params = flux.get_submodule(path)._parameters
    except AttributeError:
        return f"{path}.weight"
    return f"{path}.scale" if "weight" not in params and "scale" in params else f"{path}.weight"


def _hidden_size(flux) -> int:
    # ComfyUI's and Neo's Flux keep `hidden_size`; otherwise read it off the weights (q/k/v rows / 3,
    # or a single block's output width).
    h = getattr(flux, "hidden_size", None)
    if isinstance(h, int):
        return h
    doubles, singles = getattr(flux, "double_blocks", ()), getattr(flux, "single_blocks", ())
    if len(doubles):
        return doubles[0].img_attn.qkv.weight.shape[0] // 3
    return singles[0].linear2.weight.shape[0]


def lora_aliases(flux):
    """(alias, parameter name, offset) for every non-native name a Flux LoRA may use."""
    h = _hidden_size(flux)
    for i, _ in enumerate(getattr(flux, "double_blocks", ())):
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, n in enumerate("qkv"):
            yield f"{src}.attn.to_{n}", f"{dst}.img_attn.qkv.weight", (0, j * h, h)
            yield f"{src}.attn.add_{n}_proj", f"{dst}.txt_attn.qkv.weight", (0, j * h, h)
        for table, prefix in ((_DOUBLE, src), (_DOUBLE_XLABS, dst)):
            for a, b in table.items():
                yield f"{prefix}.{a}", _w(flux, f"{dst}.{b}"), None
    for i, block in enumerate(getattr(flux, "single_blocks", ())):
        src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        linear1 = f"{dst}.linear1.weight"
        for j, n in enumerate("qkv"):
            yield f"{src}.attn.to_{n}", linear1, (0, j * h, h)
        yield f"{src}.proj_mlp", linear1, (0, 3 * h, block.linear1.weight.shape[0] - 3 * h)
        yield f"{dst}.linear1_qkv", linear1, (0, 0, 3 * h)  # ComfyUI's own name for the q/k/v part
        yield f"{dst}.processor.qkv_lora", linear1, (0, 0, 3 * h)  # XLabs
        yield f"{dst}.processor.qkv", linear1, (0, 0, 3 * h)  # XLabs `qkv_lora.up.weight` read as an old-diffusers `_lora.up` pair
        for a, b in _SINGLE.items():
            yield f"{dst if a.startswith('processor.') else src}.{a}", _w(flux, f"{dst}.{b}"), None
    for a, b in _BASIC.items():
        yield a, f"{b}.weight", None
    yield "norm_out.linear", "final_layer.adaLN_modulation.1.weight", "swap_halves"


def lora_keys(module) -> dict:
    """The registry's LoRA name map slot: {alias: (parameter name, offset)}; a module's own names come on top."""
    return {alias: (pname, offset) for alias, pname, offset in lora_aliases(module)}
