"""`sd-accel bench --host comfy --preset <family>-tiny` end to end on a real ComfyUI (COMFYUI_PATH), on the CPU.

The command runs in its own process, as a user runs it, with dynamo's eager backend (tracing,
guards and recompiles; no kernels to build), one timed run per row. Checked: every row of the
family is there and measured (ours and the peers: ComfyUI's TorchCompileModel, EasyCache and
LazyCache), times and errors are finite, the compile rows match eager on one model call, our
compile is regional (a compiled frame per block kind, no recompiles), and the step caches changed
the trajectory (they ran) without leaving it.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import comfy_harness as harness

ROWS = ["comfy eager (baseline)", "comfy TorchCompileModel (built-in, eager)", "SDAccelCompileUNet default [eager]",
        "SDAccelStepCache fixed 3", "SDAccelStepCache forecast 3", "SDAccelCompileUNet default [eager] + SDAccelStepCache fixed 3",
        "SDAccelCompileUNet default [eager] + SDAccelStepCache forecast 3", "comfy EasyCache 0.2", "comfy LazyCache 0.2",
        "SDAccelCompileUNet default [eager] + SDAccelLoRAHotSwap, LoRA changes",
        "comfy TorchCompileModel (eager) + LoraLoaderModelOnly, LoRA changes"]
LORA_ROWS = ROWS[-2:]
# Frames our compile traces: Flux: double and single blocks; the others: one block kind (MiniMax H3: its first step's
# modulation rows, Python ints the blocks receive, differ from the later steps': a second frame, traced once).
BLOCK_KINDS = {"flux-tiny": 2, "wan-tiny": 1, "ltx-tiny": 1, "ltx2-tiny": 1, "minimax-tiny": 2}
# A peer row that may fail on a host: ComfyUI 0.8.0's EasyCache slices the model's output as one tensor, and
# LTX-2's is a (video, audio) list (nodes_easycache.py; 0.33's takes it). The bench names it; ours must not fail.
PEER_BUGS = {"ltx2-tiny": {"comfy EasyCache 0.2"}}


@pytest.fixture(scope="module")
def root():
    reason = harness.skip_reason()
    if reason:
        pytest.skip(reason)
    return harness.host_root()


def _bench(root, preset: str, out) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ)
    stubs = root / "_cpu_stubs"  # the test trees' stand-ins for torchvision / torchaudio
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(stubs) if stubs.is_dir() else None) if p)
    cmd = [sys.executable, "-m", "sd_accel.cli", "bench", "--host", "comfy", "--comfyui-path", str(root), "--preset", preset, "--device", "cpu",
           "--dynamo-backend", "eager", "--repeats", "1", "--threads", "1", "--no-progress", "--out", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    path = out / "bench.json"
    return p, (json.loads(path.read_text()) if path.is_file() else {})


@pytest.mark.parametrize("preset", sorted(BLOCK_KINDS))
def test_dit_preset_measures_ours_beside_the_peers(root, comfy_host, tmp_path, preset):
    import comfy.supported_models as sm

    needs = {"minimax-tiny": "MiniMaxH3", "ltx2-tiny": "LTXAV"}.get(preset)
    if needs and not hasattr(sm, needs):
        pytest.skip(f"this ComfyUI has no {needs} model config (the family is newer)")
    p, data = _bench(root, preset, tmp_path)
    peer_failed = set(data.get("failed", ())) & PEER_BUGS.get(preset, set())
    assert p.returncode == (1 if peer_failed else 0), p.stderr[-3000:]  # the bench exits 1 when a row failed
    assert data["complete"] and set(data["failed"]) == peer_failed and data["host"] == "comfy" and data["dynamic_vram"] is False
    assert data["comfyui"] and data["model"]
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ROWS, list(rows)
    for r in (r for n, r in rows.items() if n not in peer_failed):
        assert math.isfinite(r["ms_per_step"]) and r["ms_per_step"] > 0 and math.isfinite(r["rel_err"]), r
    for name in ROWS[1:3]:  # the compile rows: one model call against eager's, the final latent's error in the note
        assert rows[name]["rel_err"] < 1e-4 and "rel err of one model call" in rows[name]["note"], rows[name]
    diag = data["diagnostics"]
    ours = diag["SDAccelCompileUNet default [eager]"]
    assert ours["frames_compiled"] == BLOCK_KINDS[preset] and rows["SDAccelCompileUNet default [eager]"]["note"].startswith("compiled"), ours
    assert diag["SDAccelCompileUNet default [eager] + SDAccelStepCache fixed 3"]["frames_compiled"] == BLOCK_KINDS[preset]
    for name in ROWS[3:7]:  # our caches skipped work (the latent moved) and stayed near eager on this model
        assert 1e-4 < rows[name]["rel_err"] < 0.2, rows[name]
        assert "% of blocks" in diag[name]["cached"] and "cached=" in rows[name]["note"], rows[name]  # what the last run cached
    assert "cached" not in ours  # rows without a step cache say nothing of one
    # Compile under the cache: the same trajectory as the eager cache (dynamo's eager backend runs the same ops)
    assert rows[ROWS[5]]["rel_err"] == pytest.approx(rows[ROWS[3]]["rel_err"], rel=1e-3)
    # LoRA changes on the compiled model: another LoRA and another strength compile nothing, and ours
    # samples what ComfyUI's LoraLoader does (both rows' error against eager without a LoRA agree)
    for name in LORA_ROWS:
        assert [p["phase"] for p in diag[name]["phases"]] == ["another LoRA", "strength 0.5"], diag[name]
    assert all(p["frames_compiled"] == 0 for p in diag[LORA_ROWS[0]]["phases"]), diag[LORA_ROWS[0]]
    assert rows[LORA_ROWS[0]]["rel_err"] == pytest.approx(rows[LORA_ROWS[1]]["rel_err"], rel=1e-2), rows
    assert "DynamicVRAM off" in p.stdout and ROWS[-1] in p.stdout


BILLIONS = {"flux": 11.9, "qwen_image": 20.43, "zimage": 6.15, "wan": 5.0, "ltx": 1.92}  # Flux.1-dev, Qwen-Image, Z-Image, Wan 2.2 TI2V-5B, LTX-Video 2B


@pytest.mark.parametrize("family", sorted(BILLIONS))
def test_full_size_file_is_detected_as_its_family(comfy_host, family):
    """What ComfyUI's loader makes of the full-size file the GPU presets write, from its shapes alone
    (built on the meta device: no memory, no file), so a GPU run never starts on a file that fails detection."""
    import comfy.model_detection

    from sd_accel.accel_core.errors import SDAccelError
    from sd_accel.cli.bench import dit

    try:
        want = dit.config_name(family, tiny=False)
    except SDAccelError as e:  # a family newer than this host: a clear refusal
        assert "model config" in str(e) and "Update ComfyUI" in str(e)
        return
    sd = dit.build_weights(family, False, 0, "meta")
    assert round(sum(v.numel() for v in sd.values()) / 1e9, 2) == pytest.approx(BILLIONS[family], abs=0.06)
    got = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(got).__name__ == want


def test_comfy_fp8_row_loads_the_file_as_the_loaders_fp8_fast(comfy_host, tmp_path):
    """The bench's ComfyUI-fp8 peer is the Load Diffusion Model node's weight_dtype "fp8_e4m3fn_fast" on the
    preset's file: fp8 weights, ComfyUI's fp8 matmul switch on, and it samples (on the CPU ComfyUI casts back)."""
    import comfy.sample

    from sd_accel.cli.bench import dit, peers
    from sd_accel.cli.bench.comfy import make_inputs

    _, how = dit.load_model("flux", True, 0, "cpu")
    if "load_diffusion_model" not in how:
        pytest.skip(f"this ComfyUI's detection does not load the reduced Flux file ({how}); the row runs on full-size models")
    model = peers.comfy_fp8(dit.model_file("flux", True, 0, "cpu"))
    dm = model.model.diffusion_model
    assert {v.dtype for k, v in dm.state_dict().items() if k.endswith(".weight") and v.ndim == 2} == {torch.float8_e4m3fn}
    assert model.model.model_config.optimizations.get("fp8") is True
    i = make_inputs("flux", 8, 0, tiny=True)
    out = comfy.sample.sample(model, i.noise, 2, 1.0, "euler", "simple", i.positive, i.negative, i.latent, disable_pbar=True, seed=0)
    assert torch.isfinite(out).all() and out.shape == i.latent.shape
