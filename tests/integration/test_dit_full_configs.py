"""The full-size configurations the GPU scripts build (tests/gpu/dit_families.py FULL) are the
released models as ComfyUI sees them: built on the meta device (no memory), their state dict is
detected by ComfyUI's own `model_detection` as the intended class, with the intended widths and
depths, and the parameter count is the public one. The GPU runs load these files with
`comfy.sd.load_diffusion_model`, so a config that detection would not recognise fails here, on
the CPU, and not after a 22-41 GB write on the GPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
import dit_families  # noqa: E402

# the released checkpoints' sizes, in billions of parameters
PARAMS_B = {"flux": 11.90, "qwen_image": 20.43, "zimage": 6.15, "wan": 5.00}


def _accepted(family: str, unet: dict) -> dict:
    """Flux grew config fields over releases (`txt_ids_dims`): keep the ones this host's class takes."""
    if family != "flux":
        return unet
    import comfy.ldm.flux.model as fm

    names = set(fm.FluxParams.__dataclass_fields__) | {"image_model"}
    return {k: v for k, v in unet.items() if k in names}


@pytest.mark.parametrize("family", list(dit_families.FULL))
def test_full_size_config_is_detected_as_the_released_model(comfy_host, family):
    import comfy.model_detection as md
    import comfy.supported_models as sm

    spec = dit_families.FULL[family]
    if not hasattr(sm, spec["config"]):
        pytest.skip(f"this ComfyUI has no {spec['config']} model class")
    unet = _accepted(family, spec["unet"])
    config = getattr(sm, spec["config"])(dict(unet))
    config.set_inference_dtype(torch.bfloat16, None)
    with torch.device("meta"):
        model = config.get_model({}, "", device=torch.device("meta")).diffusion_model
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(PARAMS_B[family], abs=0.01)
    detected = md.model_config_from_unet(model.state_dict(), "")
    assert detected is not None, f"ComfyUI's detection does not recognise the full-size {family} state dict"
    assert type(detected).__name__ == spec["config"]
    for key, value in unet.items():
        if key in detected.unet_config:
            got = detected.unet_config[key]
            assert (list(got) if isinstance(got, tuple) else got) == (list(value) if isinstance(value, tuple) else value), key
