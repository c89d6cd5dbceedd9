"""What ComfyUI, ComfyUI-Manager and the frontend read from the pack, checked without a host:
node ids (the literal mappings the Manager's scanner parses), node_list.json, help pages,
example workflows, and web/ holding nothing the server would load by mistake."""
import ast
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STACKED = "SDAccel-stacked-cast-compile-deepcache-lora.json"
FLUX_STACKED = "SDAccel-flux-cast-compile-stepcache-lora.json"


def node_ids() -> set[str]:
    """Literal NODE_CLASS_MAPPINGS keys of nodes/*.py, read the way ComfyUI-Manager's scanner does (AST)."""
    ids = set()
    for path in (REPO / "nodes").glob("*.py"):
        for stmt in ast.parse(path.read_text()).body:
            if isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "NODE_CLASS_MAPPINGS" for t in stmt.targets):
                assert isinstance(stmt.value, ast.Dict), f"{path.name}: NODE_CLASS_MAPPINGS must be a literal dict for ComfyUI-Manager"
                ids |= {k.value for k in stmt.value.keys}
    return ids


def test_every_node_is_listed_documented_and_has_an_example():
    ids = node_ids()
    assert {"SDAccelCompileUNet", "SDAccelFP16Cast"} <= ids
    assert set(json.loads((REPO / "node_list.json").read_text())) == ids
    for node_id in ids:
        assert (REPO / "web" / "docs" / f"{node_id}.md").is_file(), f"web/docs/{node_id}.md is missing"
        wf = json.loads((REPO / "example_workflows" / f"{node_id}.json").read_text())
        assert node_id in {n["type"] for n in wf["nodes"]}


@pytest.mark.parametrize("name, chain", [
    (STACKED, ["CheckpointLoaderSimple", "SDAccelFP16Cast", "SDAccelCompileUNet", "SDAccelDeepCache", "SDAccelLoRAHotSwap"]),
    (FLUX_STACKED, ["UNETLoader", "SDAccelFP16Cast", "SDAccelCompileUNet", "SDAccelStepCache", "SDAccelLoRAHotSwap"]),
])
def test_the_stacked_examples_chain_the_nodes_into_the_sampler(name, chain):
    wf = json.loads((REPO / "example_workflows" / name).read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {link[0]: link for link in wf["links"]}  # [id, from node, from slot, to node, to slot, type]

    def upstream_model(node):
        inp = next(i for i in node["inputs"] if i["name"] == "model")
        return nodes[links[inp["link"]][1]]

    seen, node = [], next(n for n in wf["nodes"] if n["type"] == "KSampler")
    while node["type"] != chain[0]:
        node = upstream_model(node)
        seen.append(node["type"])
    assert seen[::-1] == chain


def test_example_workflows_are_frontend_workflows():
    for path in (REPO / "example_workflows").glob("*.json"):
        wf = json.loads(path.read_text())
        assert {"nodes", "links", "last_node_id", "last_link_id"} <= set(wf), path.name
        ids = {n["id"] for n in wf["nodes"]}
        for link in wf["links"]:
            assert link[1] in ids and link[3] in ids, f"{path.name}: dangling link {link}"


def test_web_holds_only_extension_modules_and_help_pages():
    # ComfyUI serves every *.js under web/ (recursively) as an extension to load.
    for path in (REPO / "web").rglob("*"):
        if path.is_dir():
            continue
        rel = path.relative_to(REPO / "web")
        assert (rel.suffix == ".js" and len(rel.parts) == 1) or (rel.parts[0] == "docs" and rel.suffix == ".md"), rel
    for js in (REPO / "web").glob("*.js"):
        if js.name != "sdaccel.js":  # helpers are imported by the extension, never register one themselves
            assert "registerExtension" not in js.read_text(), js.name
    for js in (REPO / "web").glob("*.js"):
        if js.name != "sdaccel.js":  # tests/js loads the helpers as data: URLs, with no frontend to import from
            assert not re.search(r"^\s*import\b", js.read_text(), re.M), f"{js.name} must stay import-free"


def test_the_extension_imports_only_helpers_that_ship_and_what_they_export():
    ext = (REPO / "web" / "sdaccel.js").read_text()
    for names, module in re.findall(r"import \{([^}]*)\} from \"\./([\w.]+)\"", ext):
        src = (REPO / "web" / module).read_text()
        for name in (n.strip() for n in names.split(",") if n.strip()):
            assert re.search(rf"^export (?:function|const|class) {name}\b", src, re.M), f"sdaccel.js imports {name} from {module}, which does not export it"
    assert re.search(r'from "\./sdaccel_caps\.js"', ext) and re.search(r'from "\./sdaccel_state\.js"', ext)
