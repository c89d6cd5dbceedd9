"""Every SD Accel node explains itself in the UI (DESCRIPTION, a tooltip on every input and
output), node_list.json matches, and the example workflows still fit the nodes' inputs.

Needs COMFYUI_PATH (the node modules import `folder_paths`); skipped without it.
"""
import importlib
import json
import os
import sys
from pathlib import Path

import pytest

COMFY = os.environ.get("COMFYUI_PATH")
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not COMFY or not Path(COMFY, "comfy").is_dir(),
                                reason="COMFYUI_PATH is not set to a ComfyUI checkout (see docs/testing.md)")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@pytest.fixture(scope="module")
def node_classes():
    sys.path.insert(0, COMFY)
    if Path(COMFY, "_cpu_stubs").is_dir():
        sys.path.append(str(Path(COMFY, "_cpu_stubs")))
    from comfy.cli_args import args

    args.cpu = True
    classes = {}
    for path in sorted((REPO / "nodes").glob("*.py")):
        if path.stem != "__init__":
            classes.update(importlib.import_module(f"sd_accel.nodes.{path.stem}").NODE_CLASS_MAPPINGS)
    return classes


def _inputs(cls):
    spec = cls.INPUT_TYPES()
    return {name: opt for section in ("required", "optional") for name, opt in spec.get(section, {}).items()}


def test_descriptions_and_tooltips(node_classes):
    assert len(node_classes) >= 5
    for node_id, cls in node_classes.items():
        assert len(getattr(cls, "DESCRIPTION", "")) > 40, f"{node_id}: DESCRIPTION missing or too short"
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), f"{node_id}: one OUTPUT_TOOLTIP per output"
        for name, opt in _inputs(cls).items():
            extra = opt[1] if len(opt) > 1 else {}
            assert extra.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_node_list_json_matches_the_nodes(node_classes):
    listed = json.loads((REPO / "node_list.json").read_text())
    assert listed == {k: cls.DESCRIPTION for k, cls in node_classes.items()}, \
        "node_list.json is stale: regenerate it from the nodes' DESCRIPTIONs"


def _widget_count(cls) -> int:
    n = 0
    for opt in _inputs(cls).values():
        kind, extra = opt[0], (opt[1] if len(opt) > 1 else {})
        if isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES:
            n += 1 + bool(extra.get("control_after_generate"))  # the seed's "fixed/randomize" widget
    return n


def test_example_workflows_fit_the_nodes_inputs(node_classes):
    # A stale example (a node gained or lost an input) loads with shifted widget values.
    for path in sorted((REPO / "example_workflows").glob("*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            cls = node_classes.get(node["type"])
            if cls is not None:
                assert len(node.get("widgets_values") or []) == _widget_count(cls), \
                    f"{path.name}: {node['type']} widgets are stale; rebuild with run_browser_test.py --build-workflows"
