"""The on-disk compile cache: real inductor compiles in fresh processes, plus the folder logic.

The process tests each start a fresh Python with an empty TORCHINDUCTOR_CACHE_DIR of their
own, so the only way a warm one can hit torch's FX graph cache is through our folder.
"""
import json
import logging
import os
import subprocess
import sys
import types

import pytest
import torch

from sd_accel.accel_core import CompileConfig, compile
from sd_accel.accel_core import compile_cache as cc

CHILD = r"""
import json, sys, torch
from torch._dynamo.utils import counters
from sd_accel.accel_core import CompileConfig, compile

cache_dir, batches = sys.argv[1], json.loads(sys.argv[2])
torch.manual_seed(0)
m = torch.nn.Linear(8, 4).eval()  # one extern matmul: no C++ kernel to build, so each process takes seconds
cu = compile(m, CompileConfig(backend="inductor", cache_dir=cache_dir))
phases = []
with torch.no_grad():
    for b in batches:
        x = torch.randn(b, 8)
        torch.testing.assert_close(cu(x), m(x))
        phases.append({k: counters[g][k] for g, k in (("inductor", "fxgraph_cache_hit"), ("inductor", "fxgraph_cache_miss"),
                                                     ("aot_autograd", "autograd_cache_hit"), ("aot_autograd", "autograd_cache_miss"))})
print("RESULT " + json.dumps({"phases": phases, "report": cu.report.to_dict()}))
"""


def _start(tmp_path, name: str, cache_dir, batches) -> subprocess.Popen:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor-{name}"), OMP_NUM_THREADS="1",
               TORCHINDUCTOR_COMPILE_THREADS="1")  # no pool of compile workers to start
    env.pop("TRITON_CACHE_DIR", None)
    env.pop(cc.ENV, None)
    return subprocess.Popen([sys.executable, "-c", CHILD, str(cache_dir), json.dumps(batches)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _files(folder):
    return sorted(e.path for e in cc.entries(str(folder)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """cold (folder A, batches 2, 3) -> warm (folder A, 2, 3, then a new 5); other: an empty folder B."""
    if not cc.supported():
        pytest.skip(f"torch {torch.__version__} has no torch.compiler.save_cache_artifacts")
    tmp = tmp_path_factory.mktemp("compile_cache")
    a, b = tmp / "A", tmp / "B"
    out = {"a": a, "b": b}
    # cold saves twice (batch 2, then batch 3): torch appends a second chunk per artifact type
    cold, other = _start(tmp, "cold", a, [2, 3]), _start(tmp, "other", b, [2])  # independent: in parallel
    out["cold"], out["other"] = _result(cold), _result(other)
    out["after_cold"] = [(e.path, e.keys) for e in cc.entries(str(a))]
    out["warm"] = _result(_start(tmp, "warm", a, [2, 3, 5]))
    out["after_warm"] = [(e.path, e.keys) for e in cc.entries(str(a))]
    return out


def test_cold_process_compiles_and_writes_a_cache_file(runs):
    first = runs["cold"]["phases"][0]
    assert first["fxgraph_cache_miss"] > 0 and first["fxgraph_cache_hit"] == 0, first
    assert len(runs["after_cold"]) == 1, runs["after_cold"]
    path, keys = runs["after_cold"][0]
    assert os.path.basename(path).startswith(cc.fingerprint_id(cc.fingerprint("cpu")) + ".")
    assert any(t == "inductor" for t, _ in keys), keys
    assert "saved" in runs["cold"]["report"]["cache"], runs["cold"]["report"]


def test_warm_process_hits_the_cache_it_loaded(runs):
    first, second = runs["warm"]["phases"][:2]  # both sizes the cold process saved, in its two saves
    assert first["fxgraph_cache_hit"] > 0 and second["fxgraph_cache_hit"] > first["fxgraph_cache_hit"], runs["warm"]["phases"]
    assert second["fxgraph_cache_miss"] == 0 and second["autograd_cache_miss"] == 0, second
    assert runs["warm"]["report"]["cache"].startswith("loaded "), runs["warm"]["report"]


def test_a_new_shape_adds_to_the_folder_and_replaces_the_file_it_covers(runs):
    third = runs["warm"]["phases"][2]
    assert third["fxgraph_cache_miss"] > 0, third  # batch 5 is new: compiled, then saved
    (old_path, old_keys), = runs["after_cold"]
    (new_path, new_keys), = runs["after_warm"]  # one file: the new one holds everything the old one did
    assert new_path != old_path and old_keys < new_keys


def test_another_folder_does_not_hit(runs):
    first = runs["other"]["phases"][0]
    assert first["fxgraph_cache_hit"] == 0 and first["fxgraph_cache_miss"] > 0, first
    assert len(_files(runs["b"])) == 1


# --- fast tests: folder resolution, files, failures ------------------------------------------------

def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(cc.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    assert cc.default_cache_dir(None) == str(tmp_path / "xdg" / "sd_accel" / "compile_cache")
    # ComfyUI: its user directory (its temp directory is wiped at start-up)
    monkeypatch.setitem(sys.modules, "folder_paths", types.SimpleNamespace(get_user_directory=lambda: str(tmp_path / "comfy" / "user")))
    assert cc.default_cache_dir("comfy") == str(tmp_path / "comfy" / "user" / "sd_accel" / "compile_cache")
    # webui: <data dir>/cache, or $SD_WEBUI_CACHE_DIR like modules/cache.py
    modules = types.ModuleType("modules")
    modules.paths_internal = types.SimpleNamespace(data_path=str(tmp_path / "webui"))
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.paths_internal", modules.paths_internal)
    monkeypatch.delenv("SD_WEBUI_CACHE_DIR", raising=False)
    assert cc.default_cache_dir("webui") == str(tmp_path / "webui" / "cache" / "sd_accel" / "compile_cache")
    monkeypatch.setenv("SD_WEBUI_CACHE_DIR", str(tmp_path / "wc"))
    assert cc.default_cache_dir("webui") == str(tmp_path / "wc" / "sd_accel" / "compile_cache")
    # the environment variable wins; "off" / "0" switch persistence off
    monkeypatch.setenv(cc.ENV, str(tmp_path / "mine"))
    assert cc.default_cache_dir("comfy") == str(tmp_path / "mine")
    for off in ("off", "0", "OFF"):
        monkeypatch.setenv(cc.ENV, off)
        assert cc.default_cache_dir("comfy") is None


def test_off_means_no_load_and_no_save(monkeypatch):
    """cache_dir "off", or None with $SD_ACCEL_COMPILE_CACHE=off: the holder never touches the cache API."""
    calls = []
    monkeypatch.setattr(cc, "load", lambda *a, **k: calls.append("load"))
    monkeypatch.setattr(cc, "save", lambda *a, **k: calls.append("save"))
    m = torch.nn.Linear(4, 4)
    cu = compile(m, CompileConfig(backend="inductor", cache_dir="off"))
    cu(torch.randn(2, 4))
    monkeypatch.setenv(cc.ENV, "off")
    cu3 = compile(m, CompileConfig(backend="inductor"))
    cu3(torch.randn(3, 4))
    assert calls == [] and cu3.report.cache == ""
    cu2 = compile(m, CompileConfig(backend="inductor", torch_backend="eager", cache_dir="/nonexistent"))
    cu2(torch.randn(2, 4))  # not inductor underneath: nothing to persist either
    assert calls == [] and cu.report.cache == "" and cu2.report.cache == ""


def test_the_python_api_persists_by_default_in_the_user_cache_folder(monkeypatch, tmp_path):
    """CompileConfig() with no cache_dir keeps the caches where docs/compile-cache.md says (and
    `sd-accel cache export` looks): $SD_ACCEL_COMPILE_CACHE, else ~/.cache/sd_accel/compile_cache."""
    seen = []
    monkeypatch.setattr(cc, "load", lambda path, device: seen.append(("load", path)) or cc.LoadResult(path))
    monkeypatch.setattr(cc, "save", lambda path, device, **k: seen.append(("save", path)) or cc.SaveResult())
    monkeypatch.delenv(cc.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cu = compile(torch.nn.Linear(4, 4), CompileConfig(backend="inductor"))
    cu(torch.randn(2, 4))
    assert seen and seen[0] == ("load", str(tmp_path / "xdg" / "sd_accel" / "compile_cache")), seen
    assert ("save", str(tmp_path / "xdg" / "sd_accel" / "compile_cache")) in seen


class _FakeTorchCache:
    """Stands in for torch.compiler's save/load (cumulative, like torch's) to test the folder logic fast."""

    def __init__(self):
        self.recorded: dict[str, list[str]] = {}
        self.loaded: list[bytes] = []

    def record(self, *keys):
        for k in keys:
            self.recorded.setdefault("inductor", []).append(k)

    def save(self):
        if not self.recorded:
            return None
        info = types.SimpleNamespace(artifacts={t: list(ks) for t, ks in self.recorded.items()})
        return json.dumps(self.recorded).encode() + b"x" * 1000, info

    def load(self, payload: bytes):
        self.loaded.append(payload)
        data = json.loads(payload[: payload.rindex(b"}") + 1])
        return types.SimpleNamespace(artifacts=data)


@pytest.fixture
def fake(monkeypatch):
    f = _FakeTorchCache()
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", f.save)
    monkeypatch.setattr(cc, "load_payload", f.load)
    monkeypatch.setattr(cc, "FOLDERS", cc.CacheFolders())  # a fresh "process"
    return f


def test_save_writes_only_when_something_is_new(fake, tmp_path):
    assert cc.save(str(tmp_path)).path is None  # nothing compiled yet
    fake.record("k1")
    first = cc.save(str(tmp_path))
    assert first.new == 1 and os.path.isfile(first.path)
    assert cc.save(str(tmp_path)).path is None  # the same artifacts again (a cache hit re-records them)
    fake.record("k2")
    second = cc.save(str(tmp_path))
    assert second.new == 1 and second.removed == [first.path]  # the new file covers the old one
    assert _files(tmp_path) == [second.path]


def test_other_shapes_add_a_file_instead_of_replacing(fake, tmp_path):
    fake.record("a1", "a2")
    a = cc.save(str(tmp_path)).path
    cc.FOLDERS.forget()
    fake.recorded.clear()  # a new process...
    assert cc.load(str(tmp_path)).artifacts == 2
    fake.record("b1")  # ...that compiled only another shape
    b = cc.save(str(tmp_path)).path
    assert sorted(_files(tmp_path)) == sorted([a, b])
    cc.FOLDERS.forget()
    fake.recorded.clear()  # a third process loads both
    res = cc.load(str(tmp_path))
    assert (res.files, res.artifacts) == (2, 3) and len(fake.loaded) == 3
    assert cc.load(str(tmp_path)).earlier  # once per process


def test_size_cap_removes_least_recently_used_first(fake, tmp_path):
    paths = []
    for i, k in enumerate(("k1", "k2", "k3")):
        cc.FOLDERS.forget()
        fake.recorded.clear()
        fake.record(k)
        paths.append(cc.save(str(tmp_path)).path)
        os.utime(paths[-1], (1000 + i, 1000 + i))
    size = os.path.getsize(paths[0])
    os.utime(paths[0], (2000, 2000))  # k1 was used (loaded) most recently
    removed = cc.enforce_cap(str(tmp_path), max_bytes=2 * size + size // 2, keep=paths[2])
    assert removed == [paths[1]] and sorted(_files(tmp_path)) == sorted([paths[0], paths[2]])
    cc.FOLDERS.forget()
    fake.record("k4")
    res = cc.save(str(tmp_path), max_bytes=1)  # over the cap at once: all but the file just written go
    assert _files(tmp_path) == [res.path]


def test_corrupt_or_foreign_files_are_skipped_with_a_warning(fake, tmp_path, caplog):
    fid = cc.fingerprint_id(cc.fingerprint("cpu"))
    (tmp_path / f"{fid}.0000000000000000{cc.EXT}").write_bytes(b"garbage")
    (tmp_path / f"torch0.0-py3.0-cpu-deadbeef.1111111111111111{cc.EXT}").write_bytes(b"another torch's file")
    fake.record("k1")
    good = cc.save(str(tmp_path)).path
    cc.FOLDERS.forget()
    with caplog.at_level(logging.WARNING, logger="sd_accel"):
        res = cc.load(str(tmp_path))
    assert (res.files, res.artifacts) == (1, 1) and len(res.skipped) == 1
    assert "skipped compile-cache file" in caplog.text
    assert good in _files(tmp_path)


def test_save_never_raises(fake, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    fake.record("k1")
    with caplog.at_level(logging.WARNING, logger="sd_accel"):
        res = cc.save(str(blocker / "cache"))
    assert res.error and res.path is None and "could not save the compile cache" in caplog.text


def test_cli_lists_and_clears(fake, tmp_path, capsys):
    from sd_accel.cli.main import main

    fake.record("k1", "k2")
    path = cc.save(str(tmp_path)).path
    assert main(["cache", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 files" in out and os.path.basename(path) in out and "2 artifacts" in out
    assert main(["cache", "--dir", str(tmp_path), "--clear"]) == 0
    assert _files(tmp_path) == []


def test_warmup_rows_report_both_processes_and_skip_warm_after_a_failed_cold(monkeypatch):
    from sd_accel.cli.bench import BenchConfig
    from sd_accel.cli.bench import warmup as bw

    rec = {"first_s": 12.0, "steady_s": 0.2, "eager_s": 0.5, "steps": 20, "process_s": 30.0, "rel_err": 0.001, "peak_mem_mb": None,
           "counters": {"fxgraph_cache_hit": 0, "fxgraph_cache_miss": 1, "autograd_cache_hit": 0, "autograd_cache_miss": 1},
           "report": {"cache": "empty: x; saved 3 new artifacts (1.0 MB, 0.1s)"}}
    calls = []
    monkeypatch.setattr(bw, "run_child", lambda cfg, cache_dir, inductor_dir, mode, timeout_s: calls.append((cache_dir, inductor_dir)) or dict(rec))
    diag = {}
    cold, warm = bw.warmup_rows(BenchConfig(host="comfy"), diagnostics=diag)
    assert calls[0][0] == calls[1][0] and calls[0][1] != calls[1][1]  # same compile-cache folder, fresh inductor folders
    assert cold.compile_s == pytest.approx(11.8) and cold.speedup == pytest.approx(2.5) and "first compiled run 12.0 s" in cold.note
    assert set(diag) == {bw.COLD, bw.WARM}
    assert "next runs" not in cold.note
    rec["later_runs_s"] = [0.33, 0.25, 0.2, 0.2]  # a warm process settling while torch's compile workers start
    cold, warm = bw.warmup_rows(BenchConfig(host="comfy"))
    assert "steady 0.20 s, next runs 0.33..0.20 s" in warm.note and warm.ms_per_step == pytest.approx(10.0)
    monkeypatch.setattr(bw, "run_child", lambda *a, **k: {"error": "exit 1: boom"})
    cold, warm = bw.warmup_rows(BenchConfig(host="comfy"))
    assert "FAILED: exit 1: boom" in cold.note and "the cold run failed" in warm.note


def test_the_file_records_the_compile_config_that_made_it(runs):
    (entry,) = cc.entries(str(runs["a"]))
    assert entry.header.get("compile", {}).get("backend") == "inductor", entry.header
    assert entry.header["compile"]["mode"] == "default" and entry.header["compile"]["method"] == "forward"
