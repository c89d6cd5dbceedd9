"""install.py: never touches torch, installs only what is missing under the webui, reports optional backends per torch/CUDA/Python."""
import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def install(monkeypatch):
    # Loaded by path, like the hosts run it (`install` is too generic a name to import).
    spec = importlib.util.spec_from_file_location("sd_accel_install_under_test", ROOT / "install.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("version, want", [
    ("2.3.0+cu121", ("2.3.0", "12.1")), ("2.2.2+cu118", ("2.2.2", "11.8")), ("2.1.2+cpu", ("2.1.2", None)),
    ("2.4.1+rocm6.1", ("2.4.1", None)), ("2.3.0", ("2.3.0", None)), ("2.6.0+cu124", ("2.6.0", "12.4")),
])
def test_parse_torch_version(install, version, want):
    assert install.parse_torch_version(version) == want


def test_stable_fast_wheel_for_a_supported_set_up(install):
    url, why = install.stable_fast_wheel(install.Env("2.3.0", "12.1", (3, 10), "linux"))
    assert url == ("https://github.com/chengzeyi/stable-fast/releases/download/v1.0.5/"
                   "stable_fast-1.0.5+torch230cu121-cp310-cp310-manylinux2014_x86_64.whl")
    url, _ = install.stable_fast_wheel(install.Env("2.2.2", "11.8", (3, 11), "win32"))
    assert url.endswith("stable_fast-1.0.5+torch222cu118-cp311-cp311-win_amd64.whl")


@pytest.mark.parametrize("env, says", [
    (("2.1.2", "12.1", (3, 10), "linux"), "torch 2.1.2"),
    (("2.3.0", "12.4", (3, 10), "linux"), "CUDA 12.4"),
    (("2.3.0", "12.1", (3, 12), "linux"), "Python 3.12"),
    (("2.3.0", None, (3, 10), "linux"), "CUDA none"),
    (("2.3.0", "12.1", (3, 10), "darwin"), "darwin"),
])
def test_stable_fast_says_why_there_is_no_wheel(install, env, says):
    url, why = install.stable_fast_wheel(install.Env(*env))
    assert url is None and "no wheel" in why and says in why and "inductor" in why


def test_stable_fast_on_new_torch_says_its_source_does_not_build(install):
    _, why = install.stable_fast_wheel(install.Env("2.11.0", "13.0", (3, 12), "linux"))
    assert "does not build against torch 2.11+" in why and "docs/backends.md" in why
    _, why = install.stable_fast_wheel(install.Env("2.6.0", "12.4", (3, 12), "linux"))
    assert "needs nvcc" in why and "does not build" not in why


@pytest.mark.parametrize("env, ok, says", [
    (("2.3.0", "12.1", (3, 10), "linux"), True, "community_cu122"),
    (("2.3.0", "11.8", (3, 9), "linux"), True, "community_cu118"),
    (("2.3.0", "12.1", (3, 11), "linux"), False, "Python 3.11"),
    (("2.3.0", "12.4", (3, 10), "linux"), False, "CUDA 12.4"),
    (("2.3.0", "12.1", (3, 10), "win32"), False, "Linux only"),
])
def test_onediff_status(install, env, ok, says):
    cmd, why = install.onediff_status(install.Env(*env))
    assert (cmd is not None) == ok
    assert says in (cmd or why)


class _Launch(types.ModuleType):
    def __init__(self, installed):
        super().__init__("launch")
        self.installed, self.calls = set(installed), []

    def is_installed(self, name):
        return name in self.installed

    def run_pip(self, command, desc=None):
        self.calls.append(command)


def _as_webui(monkeypatch, install, launch):
    monkeypatch.setitem(sys.modules, "launch", launch)
    monkeypatch.setattr(install, "_webui_launch", lambda: launch)


def test_under_the_webui_installs_only_missing_requirements(install, monkeypatch, capsys):
    launch = _Launch({"numpy", "tqdm"})
    _as_webui(monkeypatch, install, launch)
    monkeypatch.delenv("SD_ACCEL_INSTALL", raising=False)
    out = install.main(install.Env("2.3.0", "12.1", (3, 10), "linux"))
    assert launch.calls == ["install safetensors>=0.4"]
    assert any("stable-fast" in line and "pip install --no-deps https://" in line for line in out)
    assert "SD Accel install:" in capsys.readouterr().out


def test_opt_in_stable_fast_install_keeps_torch(install, monkeypatch):
    launch = _Launch(install.REQUIRED)
    _as_webui(monkeypatch, install, launch)
    monkeypatch.setenv("SD_ACCEL_INSTALL", "stable-fast")
    monkeypatch.setattr(install.importlib.util, "find_spec", lambda name, *a: None if name == "sfast" else object())
    install.main(install.Env("2.3.0", "12.1", (3, 10), "linux"))
    assert len(launch.calls) == 1 and launch.calls[0].startswith("install --no-deps https://github.com/chengzeyi/stable-fast/")
    launch.calls.clear()
    out = install.main(install.Env("2.5.1", "12.4", (3, 11), "linux"))
    assert launch.calls == [] and any("SD_ACCEL_INSTALL=stable-fast: not installed" in line for line in out)


def test_never_pip_installs_torch(install):
    with pytest.raises(RuntimeError, match="refusing"):
        install._pip(_Launch(()), "torch==2.1.2 torchvision", "x")
    with pytest.raises(RuntimeError, match="refusing"):
        install._pip(_Launch(()), "-U torch", "x")


def test_under_comfyui_manager_it_only_reports(install, monkeypatch):
    monkeypatch.setattr(install, "_webui_launch", lambda: None)
    calls = []
    monkeypatch.setattr(install.subprocess, "check_call", lambda *a, **k: calls.append(a))
    monkeypatch.delenv("SD_ACCEL_INSTALL", raising=False)
    out = install.main(install.Env("2.6.0", "12.4", (3, 12), "linux"))
    assert calls == []
    assert any("stable-fast: not installed; stable-fast has no wheel for torch 2.6.0, CUDA 12.4, Python 3.12" in line for line in out)
    assert any("oneflow has no wheel for Python 3.12" in line for line in out)


def test_detect_reads_the_installed_torch_without_importing_it(install):
    env = install.detect()
    import torch

    assert env.torch == torch.__version__.split("+")[0]
    assert env.python == sys.version_info[:2]
