"""The benchmark's generated checkpoint lists every tensor of ComfyUI's UNet, with DynamicVRAM's
lazy layers too (there ComfyUI's own Linear has no weight until it loads one)."""
from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch


@pytest.fixture()
def bench_comfy(comfy_host):
    return importlib.import_module("sd_accel.cli.bench.comfy")


def _reference_shapes(arch, bench_comfy):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = dict(bench_comfy.SD15_UNET if arch == "sd15" else bench_comfy.SDXL_UNET)
    unet = UNetModel(**cfg, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
    return {f"model.diffusion_model.{k}": tuple(v.shape) for k, v in unet.state_dict().items()}


@pytest.mark.parametrize("arch", ["sd15"])  # SDXL: the same code, 4x the random fill
def test_state_dict_has_every_tensor_of_comfy_unet(arch, bench_comfy, monkeypatch):
    expected = _reference_shapes(arch, bench_comfy)  # CPU: no DynamicVRAM, every layer has its weights
    cmm = importlib.import_module("comfy.memory_management") if importlib.util.find_spec("comfy.memory_management") else None
    if hasattr(cmm, "aimdo_enabled"):
        monkeypatch.setattr(cmm, "aimdo_enabled", True)  # as on an NVIDIA GPU with DynamicVRAM on
        assert len(_reference_shapes(arch, bench_comfy)) < len(expected), "ComfyUI's lazy layers list their weights now"
    sd = bench_comfy.unet_state_dict(arch, 0, "cpu", torch.float16)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert all(v.dtype == torch.float16 and torch.isfinite(v).all() for v in sd.values())
