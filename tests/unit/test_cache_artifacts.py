"""Artifacts files: `sd-accel cache export FILE` / `import FILE` and the compile_cache calls under them.

The fast tests stand in for torch's save/load (as test_compile_cache does); one test compiles for
real in two fresh processes with their own inductor folders, so the second can only hit torch's
FX graph cache through the file the first one exported.
"""
import json
import os
import struct
import subprocess
import sys
import types

import pytest
import torch

from sd_accel.accel_core import CompileConfig
from sd_accel.accel_core import cache_artifacts as ca
from sd_accel.accel_core import compile_cache as cc
from sd_accel.cli.main import main


class _FakeTorchCache:
    def __init__(self):
        self.recorded: dict[str, list[str]] = {}
        self.loaded: list[bytes] = []

    def record(self, *keys):
        self.recorded.setdefault("inductor", []).extend(keys)

    def save(self):
        if not self.recorded:
            return None
        info = types.SimpleNamespace(artifacts={t: list(ks) for t, ks in self.recorded.items()})
        return json.dumps(self.recorded).encode() + b"x" * 100, info

    def load(self, payload: bytes):
        self.loaded.append(payload)
        return types.SimpleNamespace(artifacts=json.loads(payload[: payload.rindex(b"}") + 1]))


@pytest.fixture
def fake(monkeypatch):
    f = _FakeTorchCache()
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", f.save)
    monkeypatch.setattr(cc, "load_payload", f.load)
    monkeypatch.setattr(cc, "FOLDERS", cc.CacheFolders())
    monkeypatch.delenv(cc.ENV, raising=False)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    return f


def _compiled_folder(fake, folder, *keys, config=None):
    fake.record(*keys)
    return cc.save(str(folder), config=config).path


def _foreign(data: bytes, **changes) -> bytes:
    """`data` (an artifacts file) with its fingerprint changed, checksums still right."""
    (n,) = struct.unpack_from("<Q", data, len(ca.BUNDLE_MAGIC))
    at = len(ca.BUNDLE_MAGIC) + 8
    head = json.loads(data[at:at + n])
    head["fingerprint"].update(changes)
    blob = json.dumps(head).encode()
    return ca.BUNDLE_MAGIC + struct.pack("<Q", len(blob)) + blob + data[at + n:]


def test_export_then_import_carries_every_member_and_the_compile_config(fake, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cfg = CompileConfig(backend="inductor", mode="max-autotune-no-cudagraphs")
    _compiled_folder(fake, a, "k1", "k2", config=cfg)
    cc.FOLDERS.forget()
    fake.recorded.clear()
    cc.load(str(a))
    _compiled_folder(fake, a, "k3")  # another shape: a second file beside the first
    assert len(cc.entries(str(a))) == 2
    data = ca.export_bundle(str(a))
    bundle = ca.read_bundle(data)
    assert bundle.artifacts == 3 and len(bundle.members) == 2
    assert bundle.configs == [cc.config_record(cfg)] and "mode=max-autotune-no-cudagraphs" in bundle.describe()
    res = ca.import_bundle(data, str(b))
    assert len(res.written) == 2 and res.artifacts == 3
    assert {os.path.basename(e.path) for e in cc.entries(str(b))} == {os.path.basename(e.path) for e in cc.entries(str(a))}
    cc.FOLDERS.forget()
    assert cc.load(str(b)).artifacts == 3  # a new process loads them like its own
    again = ca.import_bundle(data, str(b))  # importing twice writes nothing new
    assert again.written == [] and again.present == 2


def test_import_into_a_folder_this_process_loaded_already_loads_at_once(fake, tmp_path):
    _compiled_folder(fake, tmp_path / "a", "k1")
    data = ca.export_bundle(str(tmp_path / "a"))
    cc.FOLDERS.forget()
    fake.loaded.clear()
    cc.load(str(tmp_path / "b"))  # the worker's first compiled call has passed: b was loaded (empty)
    res = ca.import_bundle(data, str(tmp_path / "b"))
    assert res.loaded_now == 1 and len(fake.loaded) == 1


@pytest.mark.parametrize("damage,found", [
    (lambda d: d[:-10], "member 1 of 1 is cut short"),
    (lambda d: d[:-5] + b"XXXXX", "does not match its checksum"),
    (lambda d: d + b"tail", "4 bytes follow the last member"),
    (lambda d: d[:40], "is damaged"),
    (lambda d: b"PK\x03\x04 a zip file", "is not an SD Accel artifacts file"),
    (lambda d: cc.MAGIC + b"\xff" * 8, "is a damaged compile-cache file"),
    (lambda d: ca.BUNDLE_MAGIC, "ends after its first line"),  # header line only: no internal struct message
    (lambda d: ca.BUNDLE_MAGIC + b"\x01\x02", "ends after its first line"),
    (lambda d: cc.MAGIC, "ends after its first line"),
])
def test_a_damaged_file_is_refused_with_what_to_do_and_nothing_is_written(fake, tmp_path, damage, found):
    _compiled_folder(fake, tmp_path / "a", "k1")
    data = damage(ca.export_bundle(str(tmp_path / "a")))
    with pytest.raises(ca.ArtifactsError) as e:
        ca.import_bundle(data, str(tmp_path / "b"), source="w.sdca")
    assert found in str(e.value) and "w.sdca" in str(e.value) and "unpack" not in str(e.value)
    assert "sd-accel cache export" in str(e.value) and "compiles as usual" in str(e.value)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("changes,found", [
    ({"torch": "2.11.0+cu130"}, "torch '2.11.0+cu130' here '" + torch.__version__ + "'"),
    ({"python": "3.9"}, "python '3.9' here"),
])
def test_a_file_from_another_torch_or_python_is_refused(fake, tmp_path, changes, found):
    _compiled_folder(fake, tmp_path / "a", "k1")
    data = _foreign(ca.export_bundle(str(tmp_path / "a")), **changes)
    with pytest.raises(ca.ArtifactsError) as e:
        ca.import_bundle(data, str(tmp_path / "b"), source="w.sdca")
    msg = str(e.value)
    assert found in msg and f"this worker has torch {torch.__version__}" in msg and "Export the artifacts on a machine like this one" in msg
    assert not (tmp_path / "b").exists()


def test_a_gpu_file_on_a_worker_with_another_or_no_gpu_is_refused(fake, tmp_path, monkeypatch):
    _compiled_folder(fake, tmp_path / "a", "k1")
    data = _foreign(ca.export_bundle(str(tmp_path / "a")), device="NVIDIA H200", triton="3.5.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ca.ArtifactsError, match="made with torch .* on NVIDIA H200 \\(triton 3.5.0\\); this worker has no CUDA GPU"):
        ca.import_bundle(data, str(tmp_path / "b"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cc, "fingerprint", lambda device="cpu": {"torch": torch.__version__, "python": "%d.%d" % sys.version_info[:2],
                                                                  "device": "NVIDIA A100-SXM4-80GB", "triton": "3.5.0"})
    with pytest.raises(ca.ArtifactsError, match="device 'NVIDIA H200' here 'NVIDIA A100-SXM4-80GB'"):
        ca.import_bundle(data, str(tmp_path / "b"))


def test_a_single_compile_cache_file_imports_as_it_is(fake, tmp_path):
    path = _compiled_folder(fake, tmp_path / "a", "k1", "k2")
    with open(path, "rb") as f:
        res = ca.import_bundle(f.read(), str(tmp_path / "b"))
    assert res.artifacts == 2 and len(res.written) == 1


def test_export_picks_the_fingerprint(fake, tmp_path):
    a = tmp_path / "a"
    _compiled_folder(fake, a, "k1")
    (a / f"torch2.0.0-py3.9-cuda-deadbeef.00{cc.EXT}").write_bytes(open(cc.entries(str(a))[0].path, "rb").read())
    assert ca.read_bundle(ca.export_bundle(str(a))).fingerprint == cc.fingerprint("cpu")  # this machine's among several
    assert len(ca.read_bundle(ca.export_bundle(str(a), "torch2.0.0")).members) == 1
    with pytest.raises(ca.ArtifactsError, match="matches 'torch9'; expected one of: torch2.0.0-py3.9-cuda-deadbeef"):
        ca.export_bundle(str(a), "torch9")
    with pytest.raises(ca.ArtifactsError, match="no compile-cache files in .* Run a compiled generation first"):
        ca.export_bundle(str(tmp_path / "empty"))


# --- the CLI ----------------------------------------------------------------------------------------

def test_cli_export_import_round_trip(fake, tmp_path, capsys):
    _compiled_folder(fake, tmp_path / "a", "k1", "k2")
    f = tmp_path / "unet.sdca"
    assert main(["cache", "export", str(f), "--dir", str(tmp_path / "a")]) == 0
    assert "wrote " in capsys.readouterr().out and f.is_file()
    assert main(["cache", "--dir", str(tmp_path / "b"), "import", str(f)]) == 0
    out = capsys.readouterr().out
    assert "imported 2 artifacts: 1 new file in" in out and "the next compiled run there loads them" in out


def test_cli_import_goes_to_the_host_folders(fake, tmp_path, capsys, monkeypatch):
    _compiled_folder(fake, tmp_path / "a", "k1")
    f = tmp_path / "unet.sdca"
    ca.write_bundle(str(f), ca.export_bundle(str(tmp_path / "a")))
    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy").mkdir(parents=True)
    assert main(["cache", "import", str(f), "--comfyui-path", str(comfy)]) == 0
    assert len(cc.entries(str(comfy / "user" / "sd_accel" / "compile_cache"))) == 1
    webui = tmp_path / "webui"
    (webui / "modules").mkdir(parents=True)
    monkeypatch.delenv("SD_WEBUI_CACHE_DIR", raising=False)
    assert main(["cache", "import", str(f), "--webui-path", str(webui)]) == 0
    assert len(cc.entries(str(webui / "cache" / "sd_accel" / "compile_cache"))) == 1
    monkeypatch.setenv("SD_WEBUI_CACHE_DIR", str(tmp_path / "wc"))
    assert main(["cache", "import", str(f), "--webui-path", str(webui)]) == 0
    assert len(cc.entries(str(tmp_path / "wc" / "sd_accel" / "compile_cache"))) == 1
    capsys.readouterr()


@pytest.mark.parametrize("argv,found", [
    (["cache", "export"], "expected the artifacts FILE to write, found none"),
    (["cache", "import"], "expected the artifacts FILE to read, found none"),
    (["cache", "import", "/nonexistent/x.sdca"], "cannot read '/nonexistent/x.sdca'"),
    (["cache", "export", "f.sdca", "--clear"], "--clear only goes with listing"),
    (["cache", "import", "f.sdca", "--webui-path", "/nonexistent"], "is not a stable-diffusion-webui / Forge folder"),
])
def test_cli_refuses_with_a_message(fake, argv, found, capsys):
    assert main(argv) == 2
    assert found in capsys.readouterr().err


def test_cli_import_of_a_foreign_file_exits_2_and_writes_nothing(fake, tmp_path, capsys):
    _compiled_folder(fake, tmp_path / "a", "k1")
    f = tmp_path / "old.sdca"
    f.write_bytes(_foreign(ca.export_bundle(str(tmp_path / "a")), torch="2.6.0"))
    assert main(["cache", "import", str(f), "--dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "was made with torch 2.6.0" in err and "compiles as usual" in err
    assert not (tmp_path / "b").exists()


# --- for real: compile in one process, export, import, hit in another ---------------------------------

CHILD = r"""
import json, sys, torch
from torch._dynamo.utils import counters
from sd_accel.accel_core import CompileConfig, compile

torch.manual_seed(0)
m = torch.nn.Linear(8, 4).eval()
cu = compile(m, CompileConfig(backend="inductor", cache_dir=sys.argv[1]))
with torch.no_grad():
    y = cu(torch.ones(2, 8))
print("RESULT " + json.dumps({"hit": counters["inductor"]["fxgraph_cache_hit"], "miss": counters["inductor"]["fxgraph_cache_miss"],
                              "y": y.tolist()}))
"""


def _child(tmp_path, name, cache_dir) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor-{name}"), OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")
    env.pop(cc.ENV, None)
    p = subprocess.run([sys.executable, "-c", CHILD, str(cache_dir)], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads([x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])


def test_an_imported_file_makes_a_fresh_process_hit_the_cache(tmp_path, capsys):
    if not cc.supported():
        pytest.skip(f"torch {torch.__version__} has no torch.compiler.save_cache_artifacts")
    cold = _child(tmp_path, "cold", tmp_path / "worker1")
    assert cold["miss"] > 0 and cold["hit"] == 0
    f = tmp_path / "linear.sdca"
    assert main(["cache", "export", str(f), "--dir", str(tmp_path / "worker1")]) == 0
    assert main(["cache", "import", str(f), "--dir", str(tmp_path / "worker2")]) == 0
    warm = _child(tmp_path, "warm", tmp_path / "worker2")
    assert warm["hit"] > 0 and warm["miss"] == 0, warm
    assert warm["y"] == cold["y"]
    capsys.readouterr()
