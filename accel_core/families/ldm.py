"""The LDM UNet family (SD1.x/SD2.x/SDXL as ComfyUI, A1111 and Forge build it), and one walk of its forward, for ComfyUI, A1111 and Forge: plain, or cut for DeepCache.

The walk is the hosts' shared forward (ComfyUI's `UNetModel._forward`, A1111's ldm/sgm
`UNetModel.forward`, Forge's `IntegratedUNet2DConditionModel.forward`): time embedding,
input blocks (keeping the skips), middle block, output blocks (each taking a skip back),
`out`. What differs between hosts comes in through an `LdmHooks` object: how a block is
called, which of `transformer_options["patches"]` the host's forward honours, the input and
output dtype handling. The hosts supply theirs (hosts/comfy/deepcache.py, hosts/webui/deepcache.py).

Three runs:
- plain (`forward`): the host's forward, block for block;
- full (`full`, cut at skip `depth`): the same, also returning the feature entering output
  block N-1-depth (the block that takes skip `depth` back), for DeepCache to keep;
- shallow (`shallow`): input blocks 0..depth, then output blocks N-1-depth.. from a kept
  feature. The output blocks that are skipped drop their ControlNet residuals, and
  `transformer_index` advances past the skipped transformers, so the blocks that run see
  what they see in the full walk.
"""
from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from ..log import logger
from .base import Family, register, units_of
from .unet_names import unet_lora_keys

# Patches in transformer_options["patches"] that the walk itself calls (the host's forward does
# too); per-layer ones (attn1_patch, forward_timestep_embed_patch, ...) are called by the blocks.
BLOCK_PATCHES = frozenset(("emb_patch", "input_block_patch", "input_block_patch_after_skip", "middle_block_after_patch", "output_block_patch"))
# Layers that advance transformer_options["transformer_index"] when they run (by class name: no host import).
TRANSFORMERS = ("SpatialTransformer", "SpatialVideoTransformer")


def apply_control(h, control, name):
    """The hosts' own `apply_control`: add the next ControlNet residual of `name` (popped off the end) in place."""
    if control is not None and name in control and len(control[name]) > 0:
        ctrl = control[name].pop()
        if ctrl is not None:
            try:
                h += ctrl
            except RuntimeError:
                logger.warning("SD Accel: ControlNet residual of shape %s could not be added to %s; skipped.", tuple(ctrl.shape), tuple(h.shape))
    return h


class LdmHooks:
    """How one host's forward differs from the walk's defaults (which are the CompVis forward's).

    Attributes:
        patches: which BLOCK_PATCHES the host's forward calls (others in the options are left
            alone, as the host leaves them).
        emb_in_x_dtype: the time embedding is cast to x's dtype before `time_embed`.
    Methods (override what the host does differently):
        embed(unet, timesteps, x): the sinusoidal embedding fed to `unet.time_embed`.
        input(unet, x): what the first input block gets.
        block(unet, module, h, emb, context, to, output_shape, control, name, kwargs): one
            block call; `name` ("input", "middle" or None for output blocks, whose residual
            goes on the skip) says which ControlNet residual to add after it.
        out(unet, h, x, to): the final layers and the output dtype.
        apply_control(h, control, name): add the next ControlNet residual (the host's own function).
    """

    patches: frozenset = frozenset()
    emb_in_x_dtype = True
    apply_control = staticmethod(apply_control)

    def embed(self, unet, timesteps, x):
        # The UNet module's own timestep_embedding: hosts patch it there.
        t_emb = sys.modules[type(unet).__module__].timestep_embedding(timesteps, unet.model_channels, repeat_only=False)
        return t_emb.to(x.dtype) if self.emb_in_x_dtype else t_emb

    def input(self, unet, x):
        return x

    def block(self, unet, module, h, emb, context, to, output_shape, control, name, kwargs):
        h = module(h, emb, context)
        return self.apply_control(h, control, name) if name else h

    def out(self, unet, h, x, to):
        h = h.type(x.dtype)
        return unet.id_predictor(h) if getattr(unet, "predict_codebook_ids", False) else unet.out(h)


def drop_skipped_control(control, skipped_outputs: int) -> None:
    """On a shallow step, discard the ControlNet residuals the skipped output blocks would have
    taken off the end of control["output"], so the blocks that run get their own ones."""
    if control is not None and "output" in control:
        for _ in range(min(skipped_outputs, len(control["output"]))):
            control["output"].pop()


def walk(unet, hooks: LdmHooks, depth: int | None, skipped: int, cached, x, timesteps=None, context=None, y=None, control=None,
         transformer_options=None, **kwargs):
    """The forward (`depth` None), or the full (`cached` None) or shallow run cut at skip `depth`.

    `skipped`: the transformers a shallow run skips (`skipped_transformers`). Returns the
    output; the full run returns (output, the h entering output block N-1-depth).
    """
    shallow = cached is not None
    to = {} if transformer_options is None else transformer_options
    to["original_shape"] = list(x.shape)
    to["transformer_index"] = 0
    given = to.get("patches", {})
    patches = {k: given[k] for k in hooks.patches if given.get(k)}
    if (y is not None) != (unet.num_classes is not None):
        raise ValueError("must specify y if and only if the model is class-conditional")
    j0 = len(unet.input_blocks) - 1 - depth if depth is not None else -1

    emb = unet.time_embed(hooks.embed(unet, timesteps, x))
    for p in patches.get("emb_patch", ()):
        emb = p(emb, unet.model_channels, to)
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)

    hs = []
    h = hooks.input(unet, x)
    for i, module in enumerate(unet.input_blocks):
        if shallow and i > depth:
            break
        to["block"] = ("input", i)
        h = hooks.block(unet, module, h, emb, context, to, None, control, "input", kwargs)
        for p in patches.get("input_block_patch", ()):
            h = p(h, to)
        hs.append(h)
        for p in patches.get("input_block_patch_after_skip", ()):
            h = p(h, to)

    if shallow:
        drop_skipped_control(control, j0)
        to["transformer_index"] += skipped
        # Output block patches (FreeU, ...) may change h in place: the kept feature must stay as kept.
        h = cached.clone() if "output_block_patch" in patches else cached
    else:
        to["block"] = ("middle", 0)
        h = hooks.block(unet, unet.middle_block, h, emb, context, to, None, control, "middle", kwargs)
        for p in patches.get("middle_block_after_patch", ()):
            h = p({"h": h, "x": x, "emb": emb, "context": context, "y": y, "timesteps": timesteps, "transformer_options": to})["h"]

    captured = None
    for j, module in enumerate(unet.output_blocks):
        if shallow and j < j0:
            continue
        to["block"] = ("output", j)
        if j == j0 and not shallow:
            captured = h.clone() if "output_block_patch" in patches else h
        hsp = hooks.apply_control(hs.pop(), control, "output")
        for p in patches.get("output_block_patch", ()):
            h, hsp = p(h, hsp, to)
        if hsp is not None:  # a patch that returns None has merged the skip itself (SUPIR)
            h = torch.cat([h, hsp], dim=1)
        del hsp
        output_shape = hs[-1].shape if hs else None
        h = hooks.block(unet, module, h, emb, context, to, output_shape, control, None, kwargs)
    out = hooks.out(unet, h, x, to)
    return (out, captured) if depth is not None and not shallow else out


def forward(unet, hooks, *args, **kwargs):
    return walk(unet, hooks, None, 0, None, *args, **kwargs)


def full(unet, hooks, depth, skipped, *args, **kwargs):
    return walk(unet, hooks, depth, skipped, None, *args, **kwargs)


def shallow(unet, hooks, depth, skipped, cached, *args, **kwargs):
    return walk(unet, hooks, depth, skipped, cached, *args, **kwargs)


def skipped_transformers(unet: nn.Module, depth: int) -> int:
    """Transformers in the blocks a shallow run at `depth` skips (counted per cut: a module walk, no state kept)."""
    j0 = len(unet.input_blocks) - 1 - depth
    mods = list(unet.input_blocks[depth + 1:]) + ([unet.middle_block] if unet.middle_block is not None else []) + list(unet.output_blocks[:j0])
    return sum(1 for m in mods for layer in m if any(c.__name__ in TRANSFORMERS for c in type(layer).__mro__))


def paths(unet: nn.Module, hooks: LdmHooks, depth: int):
    """(full, shallow) callables cut at `depth`, called like the host's forward (shallow: the kept feature first)."""
    n = skipped_transformers(unet, depth)
    return functools.partial(full, unet, hooks, depth, n), functools.partial(shallow, unet, hooks, depth, n)


def _is_ldm(module) -> bool:
    return all(hasattr(module, a) for a in ("input_blocks", "middle_block", "output_blocks", "out", "time_embed"))


LDM = register(Family(
    name="ldm", display="SD1.x/SD2.x/SDXL UNet (LDM UNetModel)", probe=_is_ldm,
    entry=("_forward", "forward"),  # ComfyUI's body inside its DIFFUSION_MODEL wrappers; A1111/Forge: forward
    units=lambda m: units_of(m, ["time_embed", "label_emb", "input_blocks", "middle_block", "output_blocks", "out"]),
    lora_keys=unet_lora_keys,
    skip_count=lambda m: len(m.input_blocks),
    host_walk=sys.modules[__name__],
    lora_hints=("input_blocks", "output_blocks", "down_blocks", "up_blocks", "mid_block", "middle_block"),
))

__all__ = ["LDM", "LdmHooks", "BLOCK_PATCHES", "walk", "forward", "full", "shallow", "paths", "skipped_transformers", "drop_skipped_control", "apply_control"]
