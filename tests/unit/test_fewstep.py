"""Which few-step LoRA a file is (accel_core.fewstep): by the name in its metadata or file name, for the
model's family; anything else is refused with the list of known ones."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sd_accel.accel_core.errors import SDAccelError
from sd_accel.accel_core.fewstep import recognise


def _file(tmp_path, name, metadata=None):
    p = tmp_path / name
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 4)}, str(p), metadata=metadata)
    return str(p)


@pytest.mark.parametrize("family,name,want", [
    ("qwen_image", "Qwen-Image-Lightning-4steps-V1.0.safetensors", ("Qwen-Image-Lightning 4-step", 4, 1.0, "euler", 3.0, 1.0)),
    ("qwen_image", "Qwen-Image-Lightning-8steps-V2.0-bf16.safetensors", ("Qwen-Image-Lightning 8-step", 8, 1.0, "euler", 3.0, 1.0)),
    ("wan", "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors", ("Wan lightx2v 4-step (step/CFG distill)", 4, 1.0, "lcm", 5.0, 1.0)),
    ("flux", "Hyper-FLUX.1-dev-16steps-lora.safetensors", ("Hyper-FLUX.1-dev 16-step", 16, 1.0, "euler", None, 0.125)),
    ("flux", "Hyper-FLUX.1-dev-8steps-lora.safetensors", ("Hyper-FLUX.1-dev 8-step", 8, 1.0, "euler", None, 0.125)),
    ("flux", "FLUX.1-Turbo-Alpha.safetensors", ("FLUX.1-Turbo-Alpha 8-step", 8, 1.0, "euler", None, 1.0)),
])
def test_known_files(tmp_path, family, name, want):
    fs = recognise(family, family, _file(tmp_path, name))
    assert (fs.name, fs.steps, fs.cfg, fs.sampler, fs.shift, fs.strength) == want
    assert fs.family == family


def test_metadata_names_a_renamed_file(tmp_path):
    fs = recognise("qwen_image", "Qwen-Image", _file(tmp_path, "renamed.safetensors", {"name": "Qwen-Image-Lightning-4steps"}))
    assert fs.steps == 4


def test_a_lightning_name_on_another_family_is_not_enough(tmp_path):
    with pytest.raises(SDAccelError, match="not a few-step LoRA SD Accel knows.*Hyper-FLUX"):
        recognise("flux", "Flux", _file(tmp_path, "Qwen-Image-Lightning-8steps.safetensors"))


def test_family_without_few_step_loras(tmp_path):
    with pytest.raises(SDAccelError, match="no few-step LoRA is known for Z-Image.*distilled checkpoint"):
        recognise("zimage", "Z-Image", _file(tmp_path, "zimage_turbo_lora.safetensors"))


@pytest.mark.parametrize("name,half", [
    ("wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors", "high"),
    ("wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors", "low"),
    ("Wan2.2-Lightning_T2V-A14B-4steps-lora_HIGH_fp16.safetensors", "high"),
    ("Wan2.2-Lightning_T2V-A14B-4steps-lora_LOW_fp16.safetensors", "low"),
])
def test_a_wan22_a14b_half_is_named_and_carries_the_recipe_for_the_pair(tmp_path, name, half):
    fs = recognise("wan", "Wan", _file(tmp_path, name))
    assert fs.name == f"Wan 2.2 A14B lightx2v 4-step, {half}-noise half" and (fs.steps, fs.cfg, fs.shift) == (4, 1.0, 5.0)
    assert f"{half}-noise half of a Wan 2.2 A14B pair" in fs.note and "two KSamplerAdvanced" in fs.note
    assert not recognise("wan", "Wan", _file(tmp_path, "lightx2v_T2V_14B_cfg_step_distill_v2_lora_rank64_bf16.safetensors")).note
