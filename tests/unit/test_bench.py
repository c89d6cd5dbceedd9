import json

import pytest
import torch
from safetensors.torch import save_file

from sd_accel.accel_core import SDAccelError
from sd_accel.cli.bench import BenchConfig, run_bench
from sd_accel.cli.main import main
from sd_accel.cli.bench.models import load_unet_state_dict
from sd_accel.cli.bench.run import bench_config, check_rows
from sd_accel.cli.bench.suites import row_names


def test_bench_eager_rows_write_json_and_png(tmp_path):
    seen = []
    threads_before = torch.get_num_threads()
    res = run_bench(BenchConfig(steps=2, repeats=3, threads=1, configs=("eager",), out_dir=str(tmp_path)), progress=seen.append)
    assert torch.get_num_threads() == threads_before  # pinned for the run only
    names = [r.name for r in res.rows]
    assert names == ["eager fp32 (baseline)", "eager bf16 + channels_last"]
    assert set(names) <= set(row_names("cpu"))  # what --configs is checked against
    base, bf16 = res.rows
    assert base.speedup == 1.0 and base.rel_err == 0.0 and base.ms_per_step > 0
    assert 0 < bf16.rel_err < 0.1  # bf16 drifts, but stays the same picture
    for r in res.rows:  # median of 3 timed runs, with their min-max, and the speed-up range from them
        assert r.runs == 3 and r.ms_min <= r.ms_per_step <= r.ms_max and not r.failed
        assert r.speedup_min <= r.speedup <= r.speedup_max
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["name"] for r in data["rows"]] == names and data["device"] == "cpu"
    assert all(r["spread"] == pytest.approx((r["ms_max"] - r["ms_min"]) / r["ms_per_step"]) for r in data["rows"])
    assert data["png_path"] == str(tmp_path / "bench.png") == res.png_path and data["json_path"] == res.json_path
    assert data["threads"] == 1 and data["repeats"] == 3 and data["complete"] is True and data["failed"] == []
    assert isinstance(data["busy"], bool) and "busy_reason" in data and "load_avg_start" in data
    assert all(isinstance(w["count"], int) for w in data["warnings"])
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert seen == names
    assert "speed-up" in res.table() and "min-max" in res.table() and "1 thread)" in res.table()


def test_bench_config_from_the_webui_tab(tmp_path):
    cfg = bench_config(device="cpu", preset="tiny", steps=0, checkpoint=None, rows="eager, inductor", out_dir=str(tmp_path))
    assert cfg.configs == ("eager", "inductor") and cfg.steps is None and cfg.host == "diffusers"
    assert bench_config(device="cpu", preset="tiny", steps=3, checkpoint=None, rows=" ", out_dir=str(tmp_path)).configs is None
    with pytest.raises(SDAccelError):
        bench_config(device="tpu", preset="tiny", steps=None, checkpoint=None, rows="", out_dir=str(tmp_path))


@pytest.mark.parametrize("kw,match", [
    (dict(steps=0), r"--steps expects the number of sampling steps \(a whole number of at least 1\), found 0\. Give 1 or more"),
    (dict(steps=2.5), "found 2.5"),
    (dict(repeats=0), r"--repeats expects .* found 0\. Give 1 or more"),
    (dict(threads=0), "--threads expects"),
    (dict(seed=-1), "--seed expects"),
    (dict(cfg_scale=float("inf")), "CFG scale expects a finite number"),
    (dict(configs="eager"), "--configs expects row-name prefixes"),
    (dict(out_dir=""), "--out expects a folder"),
    (dict(checkpoint=3), "--checkpoint expects a path, found 3"),
    (dict(comfyui_path=""), "--comfyui-path expects a path"),
    (dict(device="tpu"), "unknown device 'tpu'"),
])
def test_bench_config_rejects_bad_values(kw, match):
    with pytest.raises(SDAccelError, match=match):
        BenchConfig(**kw)


def test_configs_that_match_no_row_list_the_rows():
    with pytest.raises(SDAccelError, match="(?s)--configs 'nope' matches no row.*eager fp32 \\(baseline\\).*deepcache i5.*--all"):
        check_rows(BenchConfig(configs=("nope", "eager")))
    check_rows(BenchConfig(configs=("eager", "deepcache i2", "lcm")))  # prefixes of real rows pass
    cuda = row_names("cuda")
    assert "inductor reduce-overhead + fp16 + channels_last" in cuda and "eager fp16 (baseline)" == cuda[0]


def _suite_run(tmp_path, suite, **kw):
    import sd_accel.cli.bench.run as run

    old = run.SUITES
    run.SUITES = (suite,)
    try:
        return run_bench(BenchConfig(steps=1, repeats=2, threads=1, configs=("",), out_dir=str(tmp_path), **kw))
    finally:
        run.SUITES = old


def test_a_failing_row_is_marked_and_the_run_goes_on(tmp_path):
    from sd_accel.cli.bench.measure import unet_caller

    def boom():
        raise RuntimeError("no kernel for this")

    def suite(ctx):
        yield ctx.measure("eager fp32 (baseline)", lambda: unet_caller(ctx.unet))
        yield ctx.measure("broken row", boom)
        yield ctx.measure("eager again", lambda: unet_caller(ctx.unet))

    res = _suite_run(tmp_path, suite)
    assert [r.name for r in res.rows] == ["eager fp32 (baseline)", "broken row", "eager again"]
    assert res.failed == ["broken row"] and res.complete
    data = json.loads((tmp_path / "bench.json").read_text())
    broken = data["rows"][1]
    assert broken["failed"] is True and broken["ms_per_step"] is None and broken["error"] == "RuntimeError: no kernel for this"
    assert data["rows"][2]["failed"] is False and data["rows"][2]["ms_per_step"] > 0
    assert data["failed"] == ["broken row"] and data["png_path"]
    assert "FAILED" in res.table()


def test_a_run_stopped_part_way_leaves_the_rows_it_finished(tmp_path):
    from sd_accel.cli.bench.measure import unet_caller

    def suite(ctx):
        yield ctx.measure("eager fp32 (baseline)", lambda: unet_caller(ctx.unet))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _suite_run(tmp_path, suite)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["eager fp32 (baseline)"] and data["rows"][0]["ms_per_step"] > 0
    assert data["complete"] is False and data["error"].startswith("KeyboardInterrupt")


def test_a_failing_baseline_ends_the_run_with_a_message(tmp_path):
    def suite(ctx):
        yield ctx.measure("eager fp32 (baseline)", lambda: (_ for _ in ()).throw(RuntimeError("bad UNet")))

    with pytest.raises(SDAccelError, match="the baseline row failed .*RuntimeError: bad UNet.*nothing to compare with"):
        _suite_run(tmp_path, suite)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["complete"] is False and data["rows"][0]["failed"] is True


def test_busy_reason_from_load_and_spread():
    from sd_accel.cli.bench.measure import BenchRow, busy_reason

    calm = BenchRow("a", 10.0, runs=5, ms_min=9.8, ms_max=10.3)
    noisy = BenchRow("b", 10.0, runs=5, ms_min=6.0, ms_max=15.0)
    assert busy_reason(0.2, 2, [calm]) == ""
    assert "load average 3.0 on 2 core(s)" in busy_reason(3.0, 2, [calm])
    reason = busy_reason(0.2, 2, [calm, noisy])
    assert "1 row(s) varied by more than 25%" in reason and "90%" in reason and "'b'" in reason
    assert busy_reason(None, 2, [BenchRow("c", 10.0, runs=2, ms_min=1.0, ms_max=30.0)]) == ""  # 2 runs: too few to judge
    assert busy_reason(None, 2, [BenchRow("d", float("nan"), failed=True)]) == ""


def test_time_runs_warms_up_then_times_each_repeat():
    from sd_accel.cli.bench.measure import time_runs, timed_row

    calls = []
    t = time_runs(lambda: calls.append(1) or torch.zeros(1), 4, "cpu")
    assert len(calls) == 5 and len(t.runs_s) == 4 and t.first_s > 0
    row = timed_row("x", t, steps=2)
    assert row.runs == 4 and row.ms_min <= row.ms_per_step <= row.ms_max
    assert len(time_runs(lambda: calls.append(1), 2, "cpu", warm_up=False).runs_s) == 2 and len(calls) == 7


def test_library_warnings_are_held_back_and_counted(capsys, caplog):
    import logging
    import warnings

    from sd_accel.cli.bench.capture import Caught, captured

    logging.getLogger("torch.fake_lib").addHandler(logging.StreamHandler())
    caplog.set_level(logging.INFO, logger="sd_accel")
    with captured() as caught:
        for _ in range(3):
            warnings.warn("Dynamo detected a call to an lru_cache-wrapped function\nmore lines", UserWarning)
        logging.getLogger("torch.fake_lib").warning("a dtype warning")
        logging.getLogger("sd_accel").warning("our own line")
        logging.getLogger("sd_accel").info("a per-run schedule line")
    err = capsys.readouterr().err
    assert "lru_cache" not in err and "a dtype warning" not in err
    assert "our own line" in caplog.text and "a dtype warning" not in caplog.text  # ours pass through, theirs are held
    assert "a per-run schedule line" not in err and "a per-run schedule line" not in caplog.text  # the table's note says it
    summary = caught.summary()
    counts = {w["message"]: w["count"] for w in summary}
    assert counts.get("UserWarning: Dynamo detected a call to an lru_cache-wrapped function", 0) >= 1  # first line only
    assert counts["torch.fake_lib: a dtype warning"] == 1  # once, though two handlers saw it
    lines = Caught.lines_of(summary)
    assert "2 distinct" in lines[0] and len(lines) == 3
    with pytest.warns(UserWarning, match="after the run"):  # the normal path is back
        warnings.warn("after the run", UserWarning)
    logging.getLogger("torch.fake_lib").warning("after too")
    assert "after too" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["tiny", "flux-1024"])
def test_comfy_row_names_are_the_rows_it_measures(monkeypatch, preset):
    """The --configs catalogue of --host comfy against what `rows` asks for (a stand-in ComfyBench), SD and DiT presets."""
    import types

    import sd_accel.cli.bench.comfy_rows as cr
    from sd_accel.cli.bench.comfy_presets import PRESETS

    asked = []

    class B:
        model, progress, diagnostics = object(), None, {}

        def __init__(self, device, wavespeed=None):
            self.device = device
            self.cfg = types.SimpleNamespace(device=device, preset=preset, dynamo_backend="inductor", wavespeed=wavespeed)
            self.preset = PRESETS[preset]

        def measure(self, name, *a, **k):
            asked.append(name)

        measure_changes = measure

        def wanted(self, name):
            asked.append(name)
            return False

    monkeypatch.setattr(cr, "_has", lambda module: True)
    monkeypatch.setattr(cr, "_lcm_runner", lambda *a, **k: None)
    for device, wavespeed in (("cpu", None), ("cuda", None), ("cuda", "/a/checkout")):
        asked.clear()
        b = B(device, wavespeed)
        list(cr.rows(b))
        assert list(dict.fromkeys(asked)) == cr.row_names(b.cfg)
        assert any(n.startswith("WaveSpeed") for n in asked) == (wavespeed is not None and PRESETS[preset].dit)


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


def test_the_deepcache_rows(tmp_path):
    from sd_accel.cli.bench import BenchConfig, run_bench

    res = run_bench(BenchConfig(steps=3, configs=("deepcache i2",), out_dir=str(tmp_path)))
    rows = {r.name: r for r in res.rows}
    assert list(rows) == ["eager fp32 (baseline)", "deepcache i2"]
    assert 0 < rows["deepcache i2"].rel_err < 0.1 and "1/3 steps shallow" in rows["deepcache i2"].note
