"""`sd-accel`: every argument is checked with a message, --help shows every default, the console
script and `python -m sd_accel.cli` both work."""
import argparse
import json
import subprocess
import sys

import pytest

from sd_accel.cli.main import build_parser, main


def _bench_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["bench"]


@pytest.mark.parametrize("args,found", [
    (["--steps", "0"], "--steps: expects the number of sampling steps (a whole number of at least 1), found '0'"),
    (["--steps", "-3"], "found '-3'"),
    (["--steps", "ten"], "found 'ten'"),
    (["--repeats", "0"], "--repeats: expects the number of timed runs per row (a whole number of at least 1), found '0'"),
    (["--threads", "0"], "--threads: expects the number of CPU threads"),
    (["--seed", "-1"], "--seed: expects a seed (a whole number of at least 0), found '-1'"),
    (["--cfg-scale", "nan"], "--cfg-scale: expects a finite number of 0 or more, found 'nan'"),
    (["--cfg-scale", "-2"], "found '-2'"),
    (["--preset", "sd3"], "invalid choice: 'sd3'"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--configs"], "expected at least one argument"),
    (["--all", "--configs", "eager"], "argument --configs: not allowed with argument --all"),
])
def test_bad_arguments_are_refused_with_what_was_expected_and_found(args, found, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert found in err, err
    if "expects" in found:
        assert "; give " in err  # and what to do


def test_configs_matching_no_row_lists_the_rows_before_loading_anything(tmp_path, capsys, monkeypatch):
    import sd_accel.cli.bench.measure as measure

    monkeypatch.setattr(measure, "build_unet", lambda *a, **k: pytest.fail("the UNet was built before --configs was checked"))
    assert main(["bench", "--configs", "nope", "eager", "zz", "--no-progress", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--configs 'nope' 'zz' matches no row" in err
    for row in ("eager fp32 (baseline)", "inductor default + bf16 + channels_last", "deepcache i3", "lora hot-swap", "lcm-lora 4 steps"):
        assert row in err
    assert "Give one or more of these" in err
    assert not (tmp_path / "bench.json").exists()


def test_help_shows_every_option_with_help_text_and_its_default():
    parser = _bench_parser()
    fmt = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help text"
        shown = fmt._get_help_string(action) % {"default": action.default}
        assert "default" in shown, f"{action.option_strings}: --help does not show the default: {shown!r}"
    text = " ".join(parser.format_help().split()).replace("- ", "-")  # undo argparse's wrapping
    for needle in ("(default: cpu)", "(default: 5)", "(default: bench-out)", "(default: 0)", "default: the preset's: 7 for SD", "(default: tiny)",
                   "the preset's: tiny 8", "(default: auto)"):
        assert needle in text, needle


def test_every_subcommand_option_has_help():
    for name, sub in next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices.items():
        for action in sub._actions:
            assert action.help, f"sd-accel {name} {action.option_strings}: no help text"


def test_module_and_console_script_entry_points():
    r = subprocess.run([sys.executable, "-m", "sd_accel.cli", "bench", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "--repeats" in r.stdout, r.stderr
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sd-accel"] == "sd_accel.cli.main:main"
    pkgs = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {"sd_accel.cli", "sd_accel.cli.bench", "sd_accel.cli.serve"} <= set(pkgs)


def test_a_failed_row_makes_the_exit_status_1_and_is_listed(tmp_path, capsys, monkeypatch):
    import sd_accel.cli.bench.run as run
    from sd_accel.cli.bench.measure import BenchRow

    def suite(ctx):
        yield ctx.done(BenchRow("eager fp32 (baseline)", 10.0, steps=1, runs=1, ms_min=10.0, ms_max=10.0))
        raise RuntimeError("boom")

    monkeypatch.setattr(run, "SUITES", (suite,))
    monkeypatch.setattr(run, "BenchContext", _FakeContext)
    assert main(["bench", "--no-progress", "--out", str(tmp_path), "--steps", "1", "--repeats", "1"]) == 1
    out = capsys.readouterr()
    assert "row(s) failed: suite (its remaining rows)" in out.err and "FAILED" in out.out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["complete"] and data["failed"] == ["suite (its remaining rows)"]
    assert data["rows"][1]["failed"] and data["rows"][1]["ms_per_step"] is None and "RuntimeError: boom" in data["rows"][1]["error"]


class _FakeContext:
    """A BenchContext without a UNet (the rows come from the test's suite)."""

    def __init__(self, cfg, preset, progress=None):
        self.cfg, self.preset, self.device, self.steps, self.progress = cfg, preset, cfg.device, cfg.steps or preset.steps, progress
        self.baseline, self.rows = None, {}

    def done(self, row):
        self.baseline = self.baseline or row
        self.rows[row.name] = row
        return row


def test_an_out_folder_that_cannot_be_written_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    import sd_accel.cli.bench.measure as measure

    monkeypatch.setattr(measure, "build_unet", lambda *a, **k: pytest.fail("the UNet was built before --out was checked"))
    a_file = tmp_path / "bench-out"
    a_file.write_text("not a folder")
    assert main(["bench", "--out", str(a_file), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--out '{a_file}' cannot hold bench.json and bench.png: it is not a folder" in err and "give another --out" in err
    assert main(["bench", "--out", str(a_file / "sub"), "--no-progress"]) == 2  # below a file: refused too
    assert "it is not a folder" in capsys.readouterr().err


def test_a_refused_run_leaves_no_output_folder_behind(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--host", "comfy", "--comfyui-path", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "is not a ComfyUI tree" in capsys.readouterr().err
    assert not (tmp_path / "bench-out").exists()


def test_cache_command_checks_its_folders(tmp_path, capsys):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert main(["cache", "--dir", str(a_file)]) == 2
    assert "is a file; expected the compile-cache folder" in capsys.readouterr().err
    assert main(["cache", "--comfyui-path", str(tmp_path)]) == 2
    assert "is not a ComfyUI folder (expected comfy/ inside it)" in capsys.readouterr().err
    assert main(["cache", "--dir", str(tmp_path / "none")]) == 0
    assert "does not exist yet" in capsys.readouterr().out


def test_an_out_folder_that_cannot_be_made_is_refused_without_a_traceback(capsys, monkeypatch):
    import os

    import sd_accel.cli.bench.measure as measure

    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    monkeypatch.setattr(measure, "build_unet", lambda *a, **k: pytest.fail("the UNet was built before --out was checked"))
    assert main(["bench", "--out", "/proc/x", "--configs", "eager", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--out '/proc/x' cannot hold bench.json and bench.png" in err and "give another --out" in err and "Traceback" not in err


def test_version(capsys):
    from importlib.metadata import PackageNotFoundError, version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    try:
        expected = version("sd-accel")
    except PackageNotFoundError:
        expected = "sd-accel"
    assert out.startswith("sd-accel ") and expected in out and "torch" in out


def test_a_long_preset_on_the_cpu_says_how_long_it_may_take(tmp_path, capsys, monkeypatch):
    import sd_accel.cli.bench.run as run

    monkeypatch.setattr(run, "run_bench", lambda cfg, progress=None: pytest.fail("stop here"))
    with pytest.raises(pytest.fail.Exception):
        main(["bench", "--preset", "sdxl-1024", "--no-progress", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "sdxl-1024 on the CPU" in err and "--preset tiny" in err


def test_the_chart_title_and_labels_fit_inside_the_figure():
    pytest.importorskip("matplotlib")
    from sd_accel.cli.bench.chart import figure
    from sd_accel.cli.bench.measure import BenchResult, BenchRow

    r = BenchResult(device="cuda", device_name="NVIDIA GeForce RTX 4090 Laptop GPU (a long name to wrap, CUDA 12.8)", preset="sdxl-1024",
                    steps=20, torch="2.13", repeats=5, threads=8, busy=True, busy_reason="load average 3.2 on 2 cores; " * 6)
    r.rows = [BenchRow("eager fp16 (baseline)", 10.0, runs=5),
              BenchRow("deepcache i3 + inductor reduce-overhead + fp16 + channels_last", 5.0, speedup=2.0, runs=5)]
    fig = figure(r)
    fig.canvas.draw()
    renderer, box = fig.canvas.get_renderer(), fig.bbox
    for text in (*fig.texts, fig.axes[0].xaxis.label, *fig.axes[0].get_yticklabels()):
        ext = text.get_window_extent(renderer)
        assert ext.x0 >= 0 and ext.y0 >= 0 and ext.x1 <= box.x1 + 0.5 and ext.y1 <= box.y1 + 0.5, (text.get_text()[:40], ext, box)


def test_backends_has_a_description(capsys):
    with pytest.raises(SystemExit):
        main(["backends", "--help"])
    assert "Lists each compile backend" in capsys.readouterr().out
