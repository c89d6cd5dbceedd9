"""Fixtures for tests against a real ComfyUI (COMFYUI_PATH); tests using them skip without one.

Session-scoped, because each costs seconds to minutes on a CPU: the booted host, one
generated SD1.5-architecture checkpoint (1.7 GB fp16 in a session tmp dir), the MODEL
ComfyUI's loader makes of it, a kohya LoRA registered in a tmp `loras` folder, and the eager
reference outputs, sampled once per case. Tests must not mutate `sd15_model`: nodes clone it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_harness as harness  # noqa: E402
from testkit.events import collected  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _compile_cache_in_tmp(tmp_path_factory):
    """Compiled graphs of these tests go to a session tmp folder, not into the host tree's user dir
    (where they would pile up in .hosts/ and travel with every device run)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SD_ACCEL_COMPILE_CACHE", str(tmp_path_factory.mktemp("compile_cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def comfy_host() -> harness.Host:
    """The booted ComfyUI with this pack loaded; every test using it skips without COMFYUI_PATH
    (the webui integration tests in this folder have their own variables)."""
    reason = harness.skip_reason()
    if reason:
        pytest.skip(reason)
    return harness.boot(harness.host_root())


@pytest.fixture
def stepcache_stats(comfy_host):
    """The `stepcache_stats` events the pack emits during the test (one dict per sampling run)."""
    with collected(comfy_host.pack_module("accel_core.events"), "stepcache_stats") as seen:
        yield seen


@pytest.fixture(scope="session")
def comfy_adapter(comfy_host):
    """accel_core.hosts.comfy as ComfyUI loaded it (its compile registry is the one the nodes use)."""
    return comfy_host.pack_module("accel_core.hosts.comfy")


@pytest.fixture(scope="session")
def comfy_cast(comfy_host):
    """accel_core.hosts.comfy.cast (FP16 Cast's installer) as ComfyUI loaded it."""
    return comfy_host.pack_module("accel_core.hosts.comfy.cast")


@pytest.fixture(scope="session")
def accel(comfy_host):
    """The pack's accel_core modules as ComfyUI loaded them: .compile, .cast, .errors."""
    class _Accel:
        compile = comfy_host.pack_module("accel_core.compiling")
        cast = comfy_host.pack_module("accel_core.casting")
        errors = comfy_host.pack_module("accel_core.errors")

    return _Accel


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy_host, tmp_path_factory) -> Path:
    return harness.write_sd15_checkpoint(tmp_path_factory.mktemp("checkpoints") / "sd15_random.safetensors")


@pytest.fixture(scope="session")
def sd15_model(sd15_checkpoint):
    return harness.load_checkpoint(sd15_checkpoint)


@pytest.fixture(scope="session")
def reference(sd15_model) -> "Reference":
    return Reference(sd15_model)


class Reference:
    """Eager outputs of the unaccelerated model, sampled once per (case, LoRA) and shared."""

    def __init__(self, model):
        self.model = model
        self._out = {}

    def __call__(self, case: harness.Case = harness.TXT2IMG, model=None, key: str = ""):
        k = (case, key)
        if k not in self._out:
            self._out[k] = harness.sample(model if model is not None else self.model, case)
        return self._out[k]


@pytest.fixture(scope="session")
def lora_name(comfy_host, sd15_model, tmp_path_factory) -> str:
    """A kohya LoRA over every attention layer, in a tmp folder ComfyUI's LoraLoader lists."""
    import folder_paths

    folder = tmp_path_factory.mktemp("loras")
    harness.write_kohya_lora(folder / "sd15_random_lora.safetensors", harness.lora_targets(sd15_model))
    folder_paths.add_model_folder_path("loras", str(folder))
    assert "sd15_random_lora.safetensors" in folder_paths.get_filename_list("loras")
    return "sd15_random_lora.safetensors"
