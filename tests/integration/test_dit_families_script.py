"""tests/gpu/dit_families.py --tiny on the CPU: a case's row carries each step's time and the steps the
Step Cache ran cached, which is how the GPU run tells a cached step's cost from a full one's; --profile
writes the op tables of those steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "gpu" / "dit_families.py"


def test_cache_row_times_every_step_and_names_the_cached_ones(comfy_host, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(comfy_host.root / "_cpu_stubs"), os.environ.get("PYTHONPATH")) if p))
    p = subprocess.run([sys.executable, str(SCRIPT), "--comfyui", str(comfy_host.root), "--out", str(out), "--family", "flux",
                        "--tiny", "--case", "cache_only", "--profile", "--work", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rec = json.loads((out / "flux_cache_only.json").read_text())
    row, eager = rec["cache_only"], rec["eager"]
    steps = len(eager["step_ms"])
    assert steps >= 2 and len(row["step_ms"]) == steps and all(t > 0 for t in row["step_ms"])
    assert "cached_steps" not in eager
    assert row["cached_steps"] and all(0 < s < steps for s in row["cached_steps"])  # step 0 always runs in full
    table = Path(row["profile"]).read_text()  # --profile: the op tables of the cached row's steps
    assert "aten::" in table and Path(row["profile"]).with_suffix(".trace.json").is_file()
