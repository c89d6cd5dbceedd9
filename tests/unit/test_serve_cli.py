"""`sd-accel serve` refuses what cannot work before Ray starts, and stops cleanly: no Ray cluster
is started here (ray.init and the deployment are stood in for)."""
import os
import signal
import socket
import time

import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is not installed: pip install 'ray[serve]'")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'ray[serve]'")

from sd_accel.cli.serve import deployment as sd_serve  # noqa: E402
from sd_accel.cli.main import main  # noqa: E402


@pytest.fixture
def no_ray(monkeypatch):
    """ray.init fails the test: every refusal must come before Ray starts."""
    def init(**kw):
        raise AssertionError("ray.init was called before the arguments were checked")
    monkeypatch.setattr(ray, "init", init)


def test_cuda_without_a_gpu_is_refused_at_once(no_ray, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    t0 = time.perf_counter()
    assert main(["serve", "--device", "cuda"]) == 2
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err
    assert "torch sees no CUDA device" in err and "--device cpu" in err and "Traceback" not in err


def test_more_cuda_replicas_than_gpus_is_refused(no_ray, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["serve", "--device", "cuda", "--replicas", "2"]) == 2
    assert "needs one GPU each, found 1 GPU(s)" in capsys.readouterr().err


def test_a_file_that_is_no_checkpoint_gets_one_message(no_ray, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my prompts\n")
    assert main(["serve", "--checkpoint", str(notes)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a readable safetensors file" in err, err
    from safetensors.torch import save_file
    import torch

    other = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(2)}, str(other))
    assert main(["serve", "--checkpoint", str(other)]) == 2
    assert "holds no Stable Diffusion UNet weights" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["99999", "0", "http"])
def test_a_port_out_of_range_is_refused_by_the_parser(no_ray, port, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", port])
    assert e.value.code == 2
    assert "expects a TCP port (a whole number from 1 to 65535)" in capsys.readouterr().err


def test_a_port_in_use_is_refused(no_ray, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", "--port", str(s.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


def test_bad_warm_deepcache_is_refused(no_ray, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--warm-deepcache", "1:0"])
    assert "INTERVAL:DEPTH" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c", "replica error"])
def test_it_stops_cleanly_and_removes_its_temp_folder(how, monkeypatch, capsys):
    seen = {}

    def fake_start(cfg, replicas, data, source, progress=None, **kw):
        seen["work_dir"] = cfg.work_dir
        seen["warm"] = cfg.warm_deepcache
        os.makedirs(os.path.join(cfg.work_dir, "sd-accel-serve-cache-x"))
        progress("replica 1: loading the micro model on cpu")
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        elif how == "ctrl-c":
            raise KeyboardInterrupt
        from sd_accel.accel_core.errors import SDAccelError

        raise SDAccelError("SD Accel: 'x.safetensors' is not a readable safetensors file.")

    stopped = []
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: stopped.append("ray"))
    monkeypatch.setattr(sd_serve, "start", fake_start)
    monkeypatch.setattr(sd_serve, "stop", lambda: stopped.append("serve"))
    before = signal.getsignal(signal.SIGTERM)
    code = main(["serve", "--preset", "micro", "--warm-deepcache", "3:0", "5:1"])
    out, err = capsys.readouterr()
    assert code == (2 if how == "replica error" else 0), err
    assert "replica 1: loading the micro model" in out
    assert stopped == ["serve", "ray"] and not os.path.exists(seen["work_dir"])
    assert seen["warm"] == ((3, 0), (5, 1))
    assert "Traceback" not in err
    if how == "replica error":
        assert err.strip().splitlines() == ["SD Accel: 'x.safetensors' is not a readable safetensors file."]
    else:
        assert "stopping" in err and "stopped." in err
    assert signal.getsignal(signal.SIGTERM) == before


def test_the_store_hands_the_first_replica_error_to_the_driver():
    store = sd_serve._Store()
    store.progress("abc", "loading")
    store.fail("def", "SD Accel: bad file")
    store.fail("abc", "later error")
    events, failure = store.poll(0)
    assert events == [("1", "loading"), ("2", "failed: SD Accel: bad file"), ("1", "failed: later error")]
    assert failure == "SD Accel: bad file" and store.poll(3) == ([], "SD Accel: bad file")
