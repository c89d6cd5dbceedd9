"""The diffusers UNet family (`UNet2DConditionModel`), and one walk of its forward: plain, or cut for DeepCache.

Full (`full`, cut at skip `depth`): the forward, also returning the feature entering the
up-layer that consumes skip `depth`. Shallow (`shallow`): conv_in and the down layers
producing skips 0..depth, then the up layers from that one on, from a kept feature.
Skips are counted from the shallowest: 0 is conv_in's output, as the `DeepCache`
package's `cache_branch_id`.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from ..errors import SDAccelError
from .base import Family, register, units_of
from .unet_names import unet_lora_keys

_DIFFUSERS_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_DIFFUSERS_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


def check(unet: nn.Module) -> None:
    """Raise SDAccelError unless the walk knows every block of this UNet (SD1.x/SD2.x/SDXL)."""
    bad = [type(b).__name__ for b in unet.down_blocks if type(b).__name__ not in _DIFFUSERS_DOWN]
    bad += [type(b).__name__ for b in unet.up_blocks if type(b).__name__ not in _DIFFUSERS_UP]
    if bad:
        raise SDAccelError(f"SD Accel DeepCache: this diffusers UNet has blocks DeepCache does not know ({', '.join(sorted(set(bad)))}); expected the SD1.x/SD2.x/SDXL blocks "
                           f"{', '.join(_DIFFUSERS_DOWN + _DIFFUSERS_UP)}. Use an SD1.x, SD2.x or SDXL UNet.")
    if unet.config.addition_embed_type == "image_hint":
        raise SDAccelError("SD Accel DeepCache: UNets with addition_embed_type='image_hint' (Kandinsky) are not supported; expected an SD1.x/SD2.x/SDXL UNet.")
    n_up = sum(len(b.resnets) for b in unet.up_blocks)
    if n_up != skip_count(unet):
        raise SDAccelError(f"SD Accel DeepCache: the UNet's up path has {n_up} layers but its down path {skip_count(unet)} skip connections; expected them equal as in SD UNets.")


def _freeu_on(block) -> bool:
    return bool(getattr(block, "s1", None) and getattr(block, "s2", None) and getattr(block, "b1", None) and getattr(block, "b2", None))


def walk(unet, depth: int, cached, sample, timestep, encoder_hidden_states=None, class_labels=None, timestep_cond=None,
         attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None, encoder_attention_mask=None):
    """UNet2DConditionModel.forward (diffusers 0.2x-0.4x, without ControlNet/adapter residuals or GLIGEN),
    walked layer by layer and cut at skip `depth`.

    Full (`cached` None): returns (output, the feature entering the up-layer that consumes skip
    `depth`). Shallow: runs conv_in and the down layers producing skips 0..depth, then the up
    layers from that one on, starting from `cached`; returns the output.
    """
    shallow = cached is not None
    n_skips = 1 + sum(len(b.resnets) + (1 if b.downsamplers is not None else 0) for b in unet.down_blocks)
    u0 = n_skips - 1 - depth  # the up-layer (counted over all up blocks) that consumes skip `depth`
    up_factor = 2 ** unet.num_upsamplers
    forward_upsample_size = any(s % up_factor != 0 for s in sample.shape[-2:])
    upsample_size = None
    if attention_mask is not None:
        attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if encoder_attention_mask is not None:
        encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0

    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    ehs = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    attn_kw = dict(encoder_hidden_states=ehs, cross_attention_kwargs=cross_attention_kwargs, attention_mask=attention_mask,
                   encoder_attention_mask=encoder_attention_mask, return_dict=False)

    h = unet.conv_in(sample)
    skips = [h]
    for block in unet.down_blocks:
        attns = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            if shallow and len(skips) > depth:
                break
            h = resnet(h, emb)
            if attns is not None:
                h = attns[j](h, **attn_kw)[0]
            skips.append(h)
        if block.downsamplers is not None and not (shallow and len(skips) > depth):
            for ds in block.downsamplers:
                h = ds(h)
            skips.append(h)
        if shallow and len(skips) > depth:
            break

    if shallow:
        h = cached
    elif unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=ehs, attention_mask=attention_mask,
                               cross_attention_kwargs=cross_attention_kwargs, encoder_attention_mask=encoder_attention_mask)
        else:
            h = unet.mid_block(h, emb)

    captured = None
    u = 0
    for i, block in enumerate(unet.up_blocks):
        n_res = len(block.resnets)
        first = max(0, u0 - u) if shallow else 0
        if first >= n_res:
            u += n_res
            continue
        consumed = n_res - first
        res = skips[-consumed:]
        skips = skips[:-consumed]
        if i < len(unet.up_blocks) - 1 and forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        freeu = _freeu_on(block)
        attns = getattr(block, "attentions", None)
        for j in range(first, n_res):
            if u + j == u0:
                if not shallow:
                    captured = h
                if freeu:  # FreeU scales h in place: keep the kept feature intact
                    h = h.clone()
            r = res[-1]
            res = res[:-1]
            if freeu:
                from diffusers.utils.torch_utils import apply_freeu

                h, r = apply_freeu(block.resolution_idx, h, r, s1=block.s1, s2=block.s2, b1=block.b1, b2=block.b2)
            h = torch.cat([h, r], dim=1)
            h = block.resnets[j](h, emb)
            if attns is not None:
                h = attns[j](h, **attn_kw)[0]
        if block.upsamplers is not None:
            for up in block.upsamplers:
                h = up(h, upsample_size)
        u += n_res

    if unet.conv_norm_out:
        h = unet.conv_norm_out(h)
        h = unet.conv_act(h)
    out = unet.conv_out(h)
    return out if shallow else (out, captured)


def full(unet, depth, *args, **kwargs):
    return walk(unet, depth, None, *args, **kwargs)


def shallow(unet, depth, cached, *args, **kwargs):
    return walk(unet, depth, cached, *args, **kwargs)


def _is_diffusers(module) -> bool:
    return all(hasattr(module, a) for a in ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out"))


def skip_count(unet) -> int:
    return 1 + sum(len(b.resnets) + (1 if getattr(b, "downsamplers", None) else 0) for b in unet.down_blocks)


DIFFUSERS = register(Family(
    name="diffusers", display="SD1.x/SD2.x/SDXL UNet (diffusers UNet2DConditionModel)", probe=_is_diffusers,
    units=lambda m: units_of(m, ["time_embedding", "add_embedding", "conv_in", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_out"]),
    lora_keys=unet_lora_keys,
    skip_count=skip_count,
    walk=sys.modules[__name__],
))

__all__ = ["DIFFUSERS", "check", "walk", "full", "shallow"]
