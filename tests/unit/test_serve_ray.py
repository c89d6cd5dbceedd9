"""`sd-accel serve` on a local Ray cluster: 2 CPU replicas of a micro UNet, compiled with inductor.

Each replica keeps torch's caches in a folder of its own (as on two machines), so the second can
only skip compiling through the artifacts the first one published. The deployment is seeded
with a damaged artifacts file: both replicas refuse it with a message and go on. Inductor runs
without generated kernels (`fallback_by_default`) to keep the compiles to seconds on 2 cores;
the cache path (dynamo, AOTAutograd, FX graph cache, artifacts) is the real one.
Skips without Ray Serve (`pip install 'ray[serve]'`).
"""
import concurrent.futures
import json
import socket
import time
import urllib.error
import urllib.request

import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is not installed: pip install 'ray[serve]'")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'ray[serve]'")

from sd_accel.accel_core import compile_cache as cc  # noqa: E402
from sd_accel.cli.serve import deployment as sd_serve  # noqa: E402
from sd_accel.cli.serve.pipeline import ServeConfig  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/"

    def post(self, body, timeout: float = 120):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def info(self):
        with urllib.request.urlopen(self.url + "info", timeout=60) as r:
            return json.loads(r.read())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if not cc.supported():
        pytest.skip("this torch has no portable compile caches")
    ray.init(num_cpus=2, include_dashboard=False, namespace=sd_serve.NAMESPACE, object_store_memory=100 * 2 ** 20,
             logging_level="WARNING", log_to_driver=False)
    port = _free_port()
    cfg = ServeConfig(preset="micro", max_batch_size=2, batch_wait_s=0.2, max_steps=8, threads=1, isolated_torch_cache=True,
                      inductor_options={"fallback_by_default": True}, warm_deepcache=((2, 0),))  # the DeepCache request below is served warm
    t0 = time.perf_counter()
    try:
        sd_serve.start(cfg, replicas=2, artifacts=b"SDACCEL-COMPILE-ARTIFACTS 1\n\x05\x00garbage", artifacts_source="seed.sdca", port=port)
        started = time.perf_counter() - t0
        client = Client(port)
        infos = {}
        for _ in range(60):  # Serve picks replicas at random: ask until both answered
            i = client.info()
            infos[i["replica"]] = i
            if len(infos) == 2:
                break
        yield client, infos, started
    finally:
        sd_serve.stop()
        ray.shutdown()


def test_both_replicas_answer_and_the_second_compiles_nothing_from_cold(fleet):
    client, infos, _ = fleet
    assert len(infos) == 2, infos
    by_role = {i["role"]: i for i in infos.values()}
    assert set(by_role) == {"compiled and published", "imported"}, {k: v["role"] for k, v in infos.items()}
    first, second = by_role["compiled and published"], by_role["imported"]
    assert first["counters"]["fxgraph_cache_miss"] > 0
    c = second["counters"]
    assert c["fxgraph_cache_hit"] > 0 and c["fxgraph_cache_miss"] == 0 and c["autograd_cache_miss"] == 0, c
    assert second["artifacts"].startswith("imported ") and first["cache_dir"] != second["cache_dir"]


def test_a_damaged_seed_file_is_refused_with_a_message_by_each_replica(fleet):
    status = sd_serve.store_status()
    assert status["seed"] == "seed.sdca" and len(status["refusals"]) == 2, status
    for msg in status["refusals"].values():
        assert "seed.sdca is damaged" in msg and "compiles as usual" in msg
    assert status["published_bytes"] > 0


def test_same_seed_same_latent_on_both_replicas(fleet):
    client, _, _ = fleet
    seen = {}
    for _ in range(40):
        code, out = client.post({"seed": 7, "steps": 4})
        assert code == 200, out
        seen.setdefault(out["replica"], set()).add(out["sha256"])
        if len(seen) == 2:
            break
    assert len(seen) == 2 and len(set.union(*seen.values())) == 1, seen
    assert out["timings"]["ms_per_step"] > 0 and out["shape"] == [4, 8, 8]


def test_bad_requests_get_a_message_and_the_replicas_go_on_serving(fleet):
    client, _, _ = fleet
    code, out = client.post({"seed": 1, "loras": [{"name": "nope"}]})
    assert code == 400 and "unknown LoRA 'nope'" in out["error"]
    code, out = client.post(b"{" + b" " * 70000 + b"}")
    assert code == 413 and "above the limit" in out["error"]
    code, out = client.post({"steps": 500})
    assert code == 413 and "limit of 8" in out["error"]
    code, out = client.post({"seed": 1, "deepcache": {"interval": 2}, "steps": 4})
    assert code == 200 and out["deepcache"] == [2, 0]


def test_concurrent_requests_are_batched(fleet):
    client, _, _ = fleet
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda s: client.post({"seed": s, "steps": 4}), range(8)))
    assert all(code == 200 for code, _ in outs), outs
    assert max(o["timings"]["batch"] for _, o in outs) == 2, [o["timings"] for _, o in outs]


def test_cli_checks_its_arguments_and_starts_without_a_damaged_artifacts_file(tmp_path, monkeypatch, capsys):
    from sd_accel.cli.main import main

    assert main(["serve", "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    assert "does not exist; expected an SD1.x / SDXL .safetensors file" in capsys.readouterr().err
    assert main(["serve", "--preset", "micro", "--lora-dir", str(tmp_path / "nope")]) == 2
    assert "the LoRA folder" in capsys.readouterr().err
    bad = tmp_path / "bad.sdca"
    bad.write_bytes(b"SDACCEL-COMPILE-ARTIFACTS 1\n" + b"\x00" * 3)
    started = []

    def fake_start(cfg, replicas, data, source, **kw):
        started.append((cfg.preset, replicas, data, source))
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(sd_serve, "start", fake_start)
    monkeypatch.setattr(sd_serve, "stop", lambda: None)
    assert main(["serve", "--preset", "micro", "--replicas", "2", "--artifacts", str(bad)]) == 0
    err = capsys.readouterr().err
    assert f"{bad} is damaged" in err and "starting without it" in err
    assert started == [("micro", 2, None, str(bad))]
