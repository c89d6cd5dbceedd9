"""How ComfyUI's UNetModel._forward calls its blocks, for DeepCache's walk of the core (families/ldm.py)."""
from __future__ import annotations

from ...deepcaching import cut_paths
from ...families import ldm


class ComfyHooks(ldm.LdmHooks):
    """ComfyUI's UNetModel._forward (0.3.64 .. 0.33): blocks through forward_timestep_embed, which also
    honours forward_timestep_embed_patch; every block patch (middle_block_after_patch where the host has it)."""

    patches = ldm.BLOCK_PATCHES

    @staticmethod
    def apply_control(h, control, name):
        from comfy.ldm.modules.diffusionmodules.openaimodel import apply_control

        return apply_control(h, control, name)

    def block(self, unet, module, h, emb, context, to, output_shape, control, name, kwargs):
        from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed

        if module is not None:  # middle_block is None in some UNets
            h = forward_timestep_embed(module, h, emb, context, to, output_shape, time_context=kwargs.get("time_context"),
                                       num_video_frames=kwargs.get("num_video_frames", unet.default_num_video_frames),
                                       image_only_indicator=kwargs.get("image_only_indicator"))
        return self.apply_control(h, control, name) if name else h


COMFY = ComfyHooks()


def paths(unet, depth: int, compile_config=None):
    """The full and shallow paths of ComfyUI's UNet cut at `depth` (compiled once each with `compile_config`)."""
    return cut_paths(unet, depth, *ldm.paths(unet, COMFY, depth), compile_config)


__all__ = ["ComfyHooks", "COMFY", "paths"]
