"""One `sd-accel serve` replica's work without Ray: request checks, batches, LoRA, DeepCache, outputs."""
import base64
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from sd_accel.accel_core import cache_artifacts as ca
from sd_accel.accel_core import compile_cache as cc
from sd_accel.cli.serve.pipeline import (Pipeline, RequestError, ServeConfig, bucket_for, buckets, decode_latent, parse_request)
from testkit.loras import make_random_lora


def _body(**kw) -> bytes:
    return json.dumps(kw).encode()


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from sd_accel.cli.bench.models import build_unet
    from sd_accel.cli.serve.pipeline import MICRO

    folder = tmp_path_factory.mktemp("loras")
    unet = build_unet(MICRO, 0, "cpu", torch.float32)
    save_file(make_random_lora(unet, "kohya-diffusers", rank=2, seed=3, magnitude=0.5, dtype=torch.float32, with_text_encoder=False),
              str(folder / "style.safetensors"))
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    return folder


@pytest.fixture(scope="module")
def pipe(lora_dir):
    return Pipeline(ServeConfig(preset="micro", compile=False, max_batch_size=2, max_steps=8, lora_dir=str(lora_dir)))


def test_buckets():
    assert buckets(1) == [1] and buckets(4) == [1, 2, 4] and buckets(6) == [1, 2, 4, 6]
    assert [bucket_for(n, 6) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]


_BAD = [
    (b"x" * 70000, 413, "the request body is 70000 bytes, above the limit of 65536"),
    (_body(steps=9), 413, "'steps' is 9, above this deployment's limit of 8. Ask for 8 or less."),
    (_body(side=64), 413, "'side' is 64, above this deployment's limit of 16 (the latent side: pixels / 8)"),
    (_body(steps=0), 400, "'steps' must be a whole number of at least 1, found 0"),
    (b"{not json", 400, "expected a JSON object, found a body that is not JSON"),
    (b"[1]", 400, "expected a JSON object, found list"),
    (_body(prompt="a cat"), 400, "unknown field(s) 'prompt'"),
    (_body(loras=[{"name": "nope"}]), 400, "unknown LoRA 'nope'; this deployment has: broken, style (the .safetensors files in"),
    (_body(loras=[{"name": "../etc/passwd"}]), 400, "unknown LoRA '../etc/passwd'"),
    (_body(deepcache={"interval": 0}), 400, "'interval' must be a whole number of at least 1"),
    (_body(deepcache={"every": 3}), 400, "'deepcache' must be null or"),
    (_body(output="jpeg"), 400, "'output' must be one of latent, preview"),
    (_body(cfg="high"), 400, "'cfg' must be a number in [0, 100]"),
]


@pytest.mark.parametrize("body,status,found", _BAD, ids=[f"{i}-{status}" for i, (_, status, _) in enumerate(_BAD)])  # short ids: a body is 70 kB
def test_bad_requests_are_refused_with_a_message(pipe, body, status, found):
    with pytest.raises(RequestError) as e:
        parse_request(body, pipe.cfg, pipe.loras)
    assert e.value.status == status and found in str(e.value), str(e.value)


def _req(pipe, **kw):
    return parse_request(_body(**kw), pipe.cfg, pipe.loras)


def test_a_request_depends_on_its_own_seed_only(pipe):
    a, b, c = _req(pipe, seed=1), _req(pipe, seed=2), _req(pipe, seed=3)
    ab, ac = pipe.run_batch([a, b]), pipe.run_batch([a, c])
    assert ab[0]["sha256"] == ac[0]["sha256"]  # same batch size, other batch mates: the same bits
    assert ab[0]["sha256"] != ab[1]["sha256"] and ab[0]["timings"]["batch"] == 2
    alone = pipe.run_batch([a])[0]
    assert alone["timings"]["bucket"] == 1
    torch.testing.assert_close(decode_latent(alone), decode_latent(ab[0]), rtol=1e-4, atol=1e-5)  # another shape: other kernels
    again = pipe.run_batch([a])[0]
    assert again["sha256"] == alone["sha256"]


def test_requests_with_other_settings_run_in_their_own_group(pipe):
    out = pipe.run_batch([_req(pipe, seed=1, steps=2), _req(pipe, seed=1, steps=3), _req(pipe, seed=1, steps=2)])
    assert [o["timings"]["batch"] for o in out] == [2, 1, 2] and out[0]["sha256"] == out[2]["sha256"]


def test_lora_per_request_is_swapped_in_and_out_exactly(pipe):
    plain = pipe.run_batch([_req(pipe, seed=5)])[0]
    styled = pipe.run_batch([_req(pipe, seed=5, loras=[{"name": "style", "strength": 1.0}])])[0]
    assert styled["sha256"] != plain["sha256"] and "style.safetensors @ 1 " in styled["loras"]
    assert pipe.run_batch([_req(pipe, seed=5)])[0]["sha256"] == plain["sha256"]  # original weights, bit-exact


def test_a_lora_file_that_does_not_load_fails_its_group_only(pipe):
    out = pipe.run_batch([_req(pipe, seed=1, loras=[{"name": "broken"}]), _req(pipe, seed=1)])
    assert out[0]["status"] == 400 and "broken" in out[0]["error"]
    assert "sha256" in out[1]
    assert "sha256" in pipe.run_batch([_req(pipe, seed=1)])[0]


def test_deepcache_per_request(pipe):
    full = decode_latent(pipe.run_batch([_req(pipe, seed=2, steps=6)])[0])
    dc = pipe.run_batch([_req(pipe, seed=2, steps=6, deepcache={"interval": 3})])[0]
    assert dc["deepcache"] == [3, 0]
    err = float((decode_latent(dc) - full).norm() / full.norm())
    assert 0 < err < 0.5


def test_preview_is_a_png(pipe):
    out = pipe.run_batch([_req(pipe, output="preview")])[0]
    png = base64.b64decode(out["png"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and "latent" not in out
    assert png[16:24] == (64).to_bytes(4, "big") * 2  # 8x8 latent, 8x upscaled


def test_compiled_pipeline_exports_artifacts_and_refuses_bad_ones(tmp_path):
    if not cc.supported():
        pytest.skip("this torch has no portable compile caches")
    p = Pipeline(ServeConfig(preset="micro", max_batch_size=1, inductor_options={"fallback_by_default": True}, isolated_torch_cache=True,
                             work_dir=str(tmp_path / "w")), cache_dir=str(tmp_path / "c"))
    try:
        said = []
        p.warm_up(said.append)
        assert p.compiled.report.status == "compiled"
        assert [s.split(":")[1].split(",")[0].strip() for s in said] == ["plain UNet", "DeepCache interval 3 depth 0"]
        assert (3, 0) in p._deepcaches  # the default DeepCache request is served warm
        data = p.export_artifacts()
        assert data is not None and ca.read_bundle(data).artifacts > 0
        with pytest.raises(ca.ArtifactsError, match="is damaged"):
            p.import_artifacts(data[:-3], "a.sdca")
        assert p.artifacts.startswith("refused: SD Accel: a.sdca is damaged")
        assert "sha256" in p.run_batch([_req(p, seed=1)])[0]  # and it goes on serving
        assert len(os.listdir(tmp_path / "w")) == 1  # its own torch cache folder
        p.close()
        assert os.listdir(tmp_path / "w") == []
    finally:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        import torch._inductor.config as ic

        ic.fallback_by_default = False


# --- who compiles, who imports: the artifacts store's protocol, with Ray stood in for ----------------

class _Handle:
    """`store.method.remote(...)` runs the method at once (what ray.get would return)."""

    def __init__(self, obj):
        self.obj = obj

    def __getattr__(self, name):
        import types

        return types.SimpleNamespace(remote=getattr(self.obj, name))


class _FakeRay:
    @staticmethod
    def get(value):
        import asyncio
        import inspect

        return asyncio.run(value) if inspect.iscoroutine(value) else value


class _FakePipe:
    def __init__(self, cfg, fail=False):
        self.cfg, self.fail, self.calls, self.artifacts = cfg, fail, [], "none"

    def warm_up(self, progress=None):
        self.calls.append("warm_up")
        if self.fail:
            raise RuntimeError("out of memory")

    def export_artifacts(self):
        return b"ARTIFACTS"

    def close(self):
        pass

    def import_artifacts(self, data, source):
        self.calls.append(("import", data, source))
        if data != b"ARTIFACTS":
            raise ca.ArtifactsError(f"SD Accel: {source} is damaged")
        return "imported"


def _replica(name, cfg, fail=False):
    from sd_accel.cli.serve.deployment import _Replica

    r = _Replica.__new__(_Replica)
    r.name, r.pipe, r.said = name, _FakePipe(cfg, fail), []
    r.say = r.said.append
    return r


@pytest.mark.parametrize("shared_folder", [False, True])
def test_the_first_replica_compiles_and_publishes_the_others_import(shared_folder, tmp_path):
    from sd_accel.cli.serve.deployment import _Store

    cfg = ServeConfig(preset="micro", cache_dir=str(tmp_path) if shared_folder else None)
    store = _Handle(_Store(b"junk", "seed.sdca"))
    first, second = _replica("r1", cfg), _replica("r2", cfg)
    assert first._warm(_FakeRay, store, cfg, 1.0) == "compiled and published"
    assert first.pipe.calls == [("import", b"junk", "seed.sdca"), "warm_up"]
    assert store.obj.refusals == {"r1": "SD Accel: seed.sdca is damaged"}
    role = second._warm(_FakeRay, store, cfg, 1.0)
    if shared_folder:  # the artifacts are in the folder: the store only says they are ready
        assert store.obj.published is None and store.obj.folder_ready
        assert role == "loaded from the shared folder"
    else:
        assert role == "imported" and ("import", b"ARTIFACTS", "the artifacts replica r1 published") in second.pipe.calls
    assert second.pipe.calls[-1] == "warm_up"
    assert "compiling (the other replicas wait for its artifacts)" in first.said
    assert ("waiting for the replica that compiles" if shared_folder else "importing the artifacts (the artifacts replica r1 published)") in second.said


def test_a_replica_that_fails_to_compile_hands_the_job_on():
    from sd_accel.cli.serve.deployment import _Store

    cfg = ServeConfig(preset="micro")
    store = _Handle(_Store())
    with pytest.raises(RuntimeError, match="out of memory"):
        _replica("r1", cfg, fail=True)._warm(_FakeRay, store, cfg, 1.0)
    assert store.obj.compiler is None
    assert _replica("r2", cfg)._warm(_FakeRay, store, cfg, 1.0) == "compiled and published"
