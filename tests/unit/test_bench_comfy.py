"""`sd-accel bench --host comfy`: argument and host-path errors (the GPU rows run on a device, not in CI)."""
import pytest

from sd_accel.accel_core.bench import BenchConfig, run_bench
from sd_accel.accel_core.cli import main
from sd_accel.accel_core.errors import SDAccelError


def test_unknown_host_lists_choices():
    with pytest.raises(SDAccelError, match="diffusers, comfy"):
        BenchConfig(host="forge")


def test_comfy_host_needs_a_comfyui_tree(monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(SDAccelError, match="COMFYUI_PATH"):
        run_bench(BenchConfig(host="comfy"))


def test_comfy_host_rejects_a_folder_that_is_not_comfyui(tmp_path, capsys):
    assert main(["bench", "--host", "comfy", "--comfyui-path", str(tmp_path), "--no-progress"]) == 2
    assert "is not a ComfyUI tree" in capsys.readouterr().err


def test_comfy_host_refuses_checkpoint_before_importing_comfyui(tmp_path):
    (tmp_path / "comfy").mkdir()
    (tmp_path / "comfy" / "sd.py").write_text("raise RuntimeError('must not be imported')\n")
    with pytest.raises(SDAccelError, match="--checkpoint"):
        run_bench(BenchConfig(host="comfy", comfyui_path=str(tmp_path), checkpoint="x.safetensors"))
