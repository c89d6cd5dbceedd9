"""`sd-accel bench --host comfy`: argument and host-path errors (the GPU rows run on a device, not in CI)."""
import os

import pytest

from sd_accel.cli.bench import BenchConfig, run_bench
from sd_accel.cli.main import main
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


def test_auto_host_picks_comfy_only_when_a_comfyui_tree_is_known(tmp_path, monkeypatch):
    from sd_accel.cli.bench.command import resolve_host

    monkeypatch.setenv("COMFYUI_PATH", "x")  # recorded, so the value resolve_host sets is undone after the test
    monkeypatch.delenv("COMFYUI_PATH")
    loose = tmp_path / "checkout"
    loose.mkdir()
    assert resolve_host("auto", None, None, pack_dir=str(loose)) == "diffusers"
    assert resolve_host("auto", "/x/ComfyUI", None, pack_dir=str(loose)) == "comfy"
    assert resolve_host("auto", "/x/ComfyUI", "model.safetensors", pack_dir=str(loose)) == "diffusers"
    assert resolve_host("diffusers", "/x/ComfyUI", None, pack_dir=str(loose)) == "diffusers"
    installed = tmp_path / "ComfyUI" / "custom_nodes" / "sd_accel"
    installed.mkdir(parents=True)
    assert resolve_host("auto", None, None, pack_dir=str(installed)) == "diffusers"  # no comfy/sd.py: not a ComfyUI tree
    (tmp_path / "ComfyUI" / "comfy").mkdir()
    (tmp_path / "ComfyUI" / "comfy" / "sd.py").write_text("")
    assert resolve_host("auto", None, None, pack_dir=str(installed)) == "comfy"
    assert os.environ["COMFYUI_PATH"] == str(tmp_path / "ComfyUI")


def test_write_profile_tables_one_run(tmp_path):
    # The helper behind SD_ACCEL_BENCH_PROFILE and the warm-up child's SD_ACCEL_WARMUP_PROFILE.
    import torch

    from sd_accel.cli.bench.comfy import write_profile

    calls = []
    path = tmp_path / "sub" / "profile_x.txt"
    write_profile(lambda: calls.append(torch.ones(8, 8) @ torch.ones(8, 8)), str(path), "cpu")
    assert len(calls) == 1
    text = path.read_text()
    assert "aten::mm" in text and "Self CPU" in text


def test_a_comfyui_that_does_not_import_is_a_message_not_a_traceback(tmp_path):
    import subprocess
    import sys

    comfy = tmp_path / "comfy"
    comfy.mkdir()
    for name, text in {"__init__.py": "", "sd.py": "", "cli_args.py": "class A:\n    cpu = False\nargs = A()\n",
                       "model_management.py": "import a_requirement_that_is_missing\n"}.items():
        (comfy / name).write_text(text)
    r = subprocess.run([sys.executable, "-m", "sd_accel.cli", "bench", "--host", "comfy", "--comfyui-path", str(tmp_path),
                        "--no-progress", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "does not import here (ModuleNotFoundError: No module named 'a_requirement_that_is_missing')" in r.stderr
    assert "requirements.txt" in r.stderr and "Traceback" not in r.stderr


# --- the DiT presets ---------------------------------------------------------------------------------

def test_full_size_dit_presets_are_refused_on_the_cpu_with_the_tiny_one_named(tmp_path, capsys):
    # Refused before any ComfyUI is imported or any file written (the folder is not even a ComfyUI tree).
    assert main(["bench", "--host", "comfy", "--comfyui-path", str(tmp_path), "--preset", "qwen-image-1328", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "full-size model" in err and "--device cuda" in err and "--preset qwen-image-tiny" in err
    assert not list(tmp_path.iterdir())


def test_dit_presets_need_the_comfy_host():
    with pytest.raises(SDAccelError, match="runs through ComfyUI only.*--host comfy"):
        BenchConfig(host="diffusers", preset="flux-tiny")


def test_cfg_scale_defaults_to_the_presets_and_an_explicit_one_wins():
    assert BenchConfig(host="comfy", preset="flux-tiny").cfg_scale == 1.0
    assert BenchConfig(host="comfy", preset="qwen-image-tiny").cfg_scale == 4.0
    assert BenchConfig(host="comfy", preset="tiny").cfg_scale == 7.0
    assert BenchConfig(preset="tiny").cfg_scale == 7.0  # the diffusers host
    assert BenchConfig(host="comfy", preset="flux-tiny", cfg_scale=3.5).cfg_scale == 3.5


def test_dynamo_backend_and_dynamic_vram_choices_are_checked():
    with pytest.raises(SDAccelError, match="DiT presets"):
        BenchConfig(host="comfy", preset="tiny", dynamo_backend="eager")
    with pytest.raises(SDAccelError, match="inductor, aot_eager, eager"):
        BenchConfig(host="comfy", preset="flux-tiny", dynamo_backend="cudagraphs")
    with pytest.raises(SDAccelError, match="auto, on, off"):
        BenchConfig(host="comfy", preset="flux-tiny", dynamic_vram="yes")


def test_dit_rows_are_listed_per_device_and_configs_are_checked_against_them(tmp_path):
    from sd_accel.cli.bench.run import check_rows

    cpu = check_rows(BenchConfig(host="comfy", preset="flux-tiny", dynamo_backend="eager", out_dir=str(tmp_path)))
    assert cpu[0] == "comfy eager (baseline)"
    for peer in ("comfy TorchCompileModel (built-in, eager)", "comfy EasyCache 0.2", "comfy LazyCache 0.2",
                 "SDAccelStepCache fixed 3", "SDAccelStepCache forecast 3"):
        assert peer in cpu
    assert not any("fp8" in n for n in cpu)  # fp8 matmuls are a GPU path
    from types import SimpleNamespace

    from sd_accel.cli.bench import dit_rows

    cuda = dit_rows.row_names(SimpleNamespace(dynamo_backend="inductor", device="cuda", wavespeed=None))  # no GPU here: no BenchConfig
    cast = [n for n in cuda if n.startswith("SDAccelFP16Cast")]
    assert cast == ["SDAccelFP16Cast fp8 + SDAccelCompileUNet reduce-overhead", "SDAccelFP16Cast attention=cudnn + SDAccelCompileUNet reduce-overhead",
                    "SDAccelFP16Cast fp8 attention=cudnn + SDAccelCompileUNet reduce-overhead"]
    with pytest.raises(SDAccelError, match="matches no row"):
        check_rows(BenchConfig(host="comfy", preset="flux-tiny", configs=("SDAccelDeepCache",), out_dir=str(tmp_path)))
    ws = check_rows(BenchConfig(host="comfy", preset="flux-tiny", wavespeed=str(tmp_path), out_dir=str(tmp_path)))
    assert ws[-2:] == ["WaveSpeed FBCache 0.12", "WaveSpeed FBCache 0.12 + Compile Model+ default"]  # last: it patches torch


def test_wavespeed_rows_need_a_dit_preset_and_a_checkout(tmp_path):
    from sd_accel.cli.bench import peers

    with pytest.raises(SDAccelError, match="DiT presets"):
        BenchConfig(host="comfy", preset="tiny", wavespeed=str(tmp_path))
    with pytest.raises(SDAccelError, match="expects a path"):
        BenchConfig(host="comfy", preset="flux-tiny", wavespeed=" ")
    with pytest.raises(SDAccelError, match="Comfy-WaveSpeed checkout.*fbcache_nodes.py"):
        peers.wavespeed_module(str(tmp_path), "fbcache_nodes")
