import json

import pytest
import torch
from safetensors.torch import save_file

from sd_accel.accel_core import SDAccelError
from sd_accel.bench import BenchConfig, run_bench
from sd_accel.bench.models import load_unet_state_dict
from sd_accel.bench.cli import main


def test_bench_eager_rows_write_json_and_png(tmp_path):
    seen = []
    res = run_bench(BenchConfig(steps=2, configs=("eager",), out_dir=str(tmp_path)), progress=seen.append)
    names = [r.name for r in res.rows]
    assert names == ["eager fp32 (baseline)", "eager bf16 + channels_last"]
    base, bf16 = res.rows
    assert base.speedup == 1.0 and base.rel_err == 0.0 and base.ms_per_step > 0
    assert 0 < bf16.rel_err < 0.1  # bf16 drifts, but stays the same picture
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["name"] for r in data["rows"]] == names and data["device"] == "cpu"
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert seen == names
    assert "speed-up" in res.table()


def test_bench_bad_options():
    with pytest.raises(SDAccelError, match="preset"):
        BenchConfig(preset="sd3")
    if not torch.cuda.is_available():
        with pytest.raises(SDAccelError, match="no CUDA device"):
            BenchConfig(device="cuda")


def test_checkpoint_errors(tmp_path):
    with pytest.raises(SDAccelError, match="does not exist"):
        load_unet_state_dict(str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"PK\x03\x04 not a safetensors file")
    with pytest.raises(SDAccelError, match="not a readable safetensors"):
        load_unet_state_dict(str(bad))
    other = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(other))
    with pytest.raises(SDAccelError, match="no Stable Diffusion UNet"):
        load_unet_state_dict(str(other))
    sd2 = tmp_path / "sd2.safetensors"
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024)}, str(sd2))
    with pytest.raises(SDAccelError, match="cross-attention width 1024"):
        load_unet_state_dict(str(sd2))


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    assert main(["bench", "--checkpoint", str(tmp_path / "missing.safetensors"), "--no-progress", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["backends"]) == 0
    assert "inductor" in capsys.readouterr().out
