"""tests/gpu's PyAV stand-in (the GPU machine's trimmed ComfyUI has no PyAV): with it in place, a
library that probes for PyAV with importlib.util.find_spec (diffusers, which the bench imports)
still imports."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
import comfy_dynamic_vram  # noqa: E402


def test_find_spec_answers_for_the_stand_in(monkeypatch):
    saved = {k: v for k, v in sys.modules.items() if k == "av" or k.startswith("av.")}
    for k in saved:
        del sys.modules[k]
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError: the stand-in goes in
    try:
        comfy_dynamic_vram.av_stand_in()
        assert sys.modules["av"] is not None and importlib.util.find_spec("av") is not None
        assert importlib.util.find_spec("av.video.reformatter") is not None
        from av.container import InputContainer  # noqa: F401  (any name answers, as comfy_api's imports need)
    finally:
        for k in [k for k in sys.modules if k == "av" or k.startswith("av.")]:
            del sys.modules[k]
        sys.modules.update(saved)
        monkeypatch.undo()
