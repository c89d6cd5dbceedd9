"""A ComfyUI fleet on loopback: two CPU workers (ComfyUI's own main.py), one artifacts file.

Worker A runs a Compile UNet workflow through ComfyUI's HTTP API and leaves its compiled code in
its cache folder (<user dir>/sd_accel/compile_cache); `sd-accel cache export` packs it,
`sd-accel cache import` puts it into worker B's folder while B is already running; B then runs
the same workflow: it loads the file at its first compiled run, writes no new cache file
(compiled nothing new), and saves the same latent bits as A. Each worker keeps torch's own
caches in a folder of its own, as on two machines.

The model is a tiny SD1.x-family UNet from a test-only node (shape detection would not load it
from a file), and torch's inductor runs without generated kernels (`fallback_by_default`, set by
that test node in the worker's prompt thread) so each compile takes seconds on 2 cores; the cache path is real.
Skips without COMFYUI_PATH (docs/testing.md).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import comfy_harness as harness

REPO = Path(__file__).resolve().parents[2]
TEST_NODES = '''"""SD Accel fleet test only: a tiny SD1.x-family MODEL and a conditioning, no files needed."""
import sys
import torch
import torch._inductor.config

sys.path.insert(0, {tests!r})
import comfy_harness


class FleetTinyModel:
    CATEGORY = "sdaccel fleet test"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{}}}}

    def run(self):
        # Fast CPU compiles in this test worker. torch's inductor config is per thread: set it in
        # the thread that runs prompts (and so compiles).
        torch._inductor.config.fallback_by_default = True
        return (comfy_harness.tiny_unet_model(seed=0),)


class FleetConditioning:
    CATEGORY = "sdaccel fleet test"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"seed": ("INT", {{"default": 3}})}}}}

    def run(self, seed):
        return comfy_harness.conditioning(seed, comfy_harness.TINY_UNET_CONFIG["context_dim"])


NODE_CLASS_MAPPINGS = {{"SDAccelFleetTinyModel": FleetTinyModel, "SDAccelFleetConditioning": FleetConditioning}}
'''
WORKFLOW = {
    "1": {"class_type": "SDAccelFleetTinyModel", "inputs": {}},
    "2": {"class_type": "SDAccelCompileUNet", "inputs": {"model": ["1", 0], "backend": "inductor", "mode": "default", "dynamic": False, "fullgraph": False}},
    "3": {"class_type": "SDAccelFleetConditioning", "inputs": {"seed": 3}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 42, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
                                               "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["5", 0], "denoise": 1.0}},
    "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "fleet"}},
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    def __init__(self, root: Path, base: Path, name: str):
        self.root, self.base, self.name, self.port = root, base, name, _port()
        (base / "custom_nodes").mkdir(parents=True)
        (base / "custom_nodes" / "sd-accel").symlink_to(REPO, target_is_directory=True)
        (base / "custom_nodes" / "sdaccel_fleet_test_nodes.py").write_text(TEST_NODES.format(tests=str(Path(__file__).resolve().parent)))
        self.log = base / "comfyui.log"
        env = {k: v for k, v in os.environ.items() if k != "SD_ACCEL_COMPILE_CACHE"}  # the worker's own folder: its user dir
        env.update(TORCHINDUCTOR_CACHE_DIR=str(base / "inductor"), TORCHINDUCTOR_COMPILE_THREADS="1", OMP_NUM_THREADS="1", COMFYUI_PATH=str(root))
        launcher = ("import runpy, sys; stubs = sys.argv.pop(1); sys.path.append(stubs); "
                    "sys.argv[0] = 'main.py'; runpy.run_path('main.py', run_name='__main__')")
        cmd = [sys.executable, "-c", launcher, str(root / "_cpu_stubs"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(base), "--disable-auto-launch", "--disable-api-nodes", "--use-pytorch-cross-attention"]
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    @property
    def cache_dir(self) -> Path:
        return self.base / "user" / "sd_accel" / "compile_cache"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout: float = 300):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                log = self.log.read_text()
                if "comfyui_workflow_templates" in log and "does not exist" in log:
                    # The server (not the pack) needs this tree's own pin of the templates package.
                    pin = next((ln for ln in (self.root / "requirements.txt").read_text().splitlines() if "workflow-templates" in ln), "?")
                    pytest.skip(f"ComfyUI at {self.root} cannot start its server with the installed comfyui-workflow-templates "
                                f"(it pins {pin}); install that tree's requirements with -c constraints-cpu.txt to run this test")
                pytest.fail(f"ComfyUI {self.name} exited: {log[-3000:]}")
            try:
                with urllib.request.urlopen(self.url("/object_info/SDAccelFleetTinyModel"), timeout=5) as r:
                    if b"SDAccelFleetTinyModel" in r.read():
                        return
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(f"ComfyUI {self.name} did not come up in {timeout:.0f} s: {self.log.read_text()[-3000:]}")

    def run(self, workflow: dict, timeout: float = 600) -> dict:
        req = urllib.request.Request(self.url("/prompt"), data=json.dumps({"prompt": workflow}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            pid = json.loads(r.read())["prompt_id"]
        t0 = time.time()
        while time.time() - t0 < timeout:
            with urllib.request.urlopen(self.url(f"/history/{pid}"), timeout=30) as r:
                h = json.loads(r.read()).get(pid)
            if h and h.get("status", {}).get("completed") is not None and (h["status"]["completed"] or h["status"].get("status_str") == "error"):
                assert h["status"]["status_str"] == "success", f"{self.name}: {h['status']}\n{self.log.read_text()[-3000:]}"
                return h
            time.sleep(0.5)
        pytest.fail(f"ComfyUI {self.name}: the prompt did not finish in {timeout:.0f} s")

    def latent(self):
        from safetensors.torch import load_file

        files = sorted((self.base / "output").glob("fleet*.latent"))
        assert files, f"{self.name} saved no latent"
        return load_file(str(files[-1]))["latent_tensor"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    reason = harness.skip_reason()
    if reason:
        pytest.skip(reason)
    root = harness.host_root()
    if not (root / "main.py").is_file():
        pytest.skip(f"COMFYUI_PATH={root} has no main.py to start workers with")
    tmp = tmp_path_factory.mktemp("fleet")
    ws = [Worker(root, tmp / "worker-a", "A"), Worker(root, tmp / "worker-b", "B")]  # both boot at once
    try:
        for w in ws:
            w.wait_ready()
        yield ws
    finally:
        for w in ws:
            w.stop()


def _cli(*args) -> str:
    p = subprocess.run([sys.executable, "-m", "sd_accel.cli", "cache", *args], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "SD_ACCEL_COMPILE_CACHE"})
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_second_worker_runs_warm_from_the_first_ones_artifacts_file(workers, tmp_path):
    a, b = workers
    a.run(WORKFLOW)
    made = list(a.cache_dir.glob("*.sdcc"))
    assert len(made) == 1, f"worker A left {made} in {a.cache_dir}: {a.log.read_text()[-2000:]}"
    artifacts = tmp_path / "fleet.sdca"
    assert "wrote " in _cli("export", str(artifacts), "--dir", str(a.cache_dir))
    assert "imported " in _cli("import", str(artifacts), "--dir", str(b.cache_dir))  # B is running: its first compiled run is ahead
    imported = sorted(p.name for p in b.cache_dir.glob("*.sdcc"))
    b.run(WORKFLOW)
    log = b.log.read_text()
    assert "compile cache: loaded " in log and "saved " not in log.split("compile cache: loaded ", 1)[1].splitlines()[0], log[-3000:]
    assert sorted(p.name for p in b.cache_dir.glob("*.sdcc")) == imported  # nothing new compiled, so nothing new saved
    la, lb = a.latent(), b.latent()
    assert la.shape == lb.shape and bool((la == lb).all()), "the two workers' latents differ"


def test_a_file_from_another_torch_is_refused_and_the_worker_keeps_its_folder(workers, tmp_path):
    a, b = workers
    src = next(a.cache_dir.glob("*.sdcc"), None)
    if src is None:
        pytest.skip("worker A compiled nothing (the first test did not run)")
    data = src.read_bytes()
    foreign = tmp_path / "old.sdcc"
    foreign.write_bytes(data.replace(b'"torch": "2', b'"torch": "0', 1))  # the same header, made with "torch 0.x"
    before = sorted(p.name for p in b.cache_dir.glob("*"))
    p = subprocess.run([sys.executable, "-m", "sd_accel.cli", "cache", "import", str(foreign), "--dir", str(b.cache_dir)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "was made with torch 0" in p.stderr and "compiles as usual" in p.stderr, p.stderr
    assert sorted(p.name for p in b.cache_dir.glob("*")) == before
