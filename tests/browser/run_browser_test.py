"""Browser test: real ComfyUI (--cpu) with this pack, driven in headless Chromium.

    COMFYUI_PATH=/path/to/ComfyUI python tests/browser/run_browser_test.py [--workflow FILE] [--out DIR]
    COMFYUI_PATH=... python tests/browser/run_browser_test.py --build-workflows   # regenerate example_workflows/

What it does: writes a small SD1.5-architecture checkpoint and a LoRA (fixtures.py) into a temp
ComfyUI base directory whose custom_nodes/ links to this repo, starts ComfyUI from COMFYUI_PATH
on a free port with --cpu, opens it in Debian's Chromium through playwright-core
(browser_test.mjs), checks that every example workflow loads, loads the stacked one, points it
at the small checkpoint (64x64, 4 steps), queues it and waits until the SD Accel badges show a
final state with the run's it/s. Screenshots and logs go to --out (default .site/browser-test/,
git-ignored). Exits non-zero on any failure.

It then queues the same graph with a new seed and LoRA strength (nothing may recompile) and,
where the frontend has the Nodes 2.0 renderer (setting Comfy.VueNodes.Enabled), reloads it
with that renderer on and queues once more: every badge must reach the node's DOM, and a
click on the badge of a (played) partial compile must show the reasons as a toast (so must
one on the classic canvas, where the frontend's badges take clicks).

Needs: COMFYUI_PATH with ComfyUI's Python requirements; /usr/bin/chromium (`apt-get install -y
chromium`); node and npm. playwright-core (npm, into tests/browser/node_modules) is installed on
first use. The frontend is the version the host's requirements.txt pins
(`comfyui-frontend-package==X`), installed on first use with `pip install --no-deps --target
.site/fe-X` (static files only, nothing on sys.path) and handed to ComfyUI with
--front-end-root. Each host gets its own folder, so the three test hosts run side by side:

    for v in 0.3.64 0.8.0 0.33.0; do   # frontends 1.27.10, 1.35.9, 1.49.6
      COMFYUI_PATH=.hosts/ComfyUI-$v python3 tests/browser/run_browser_test.py --out .site/bt-$v
    done

Set COMFYUI_FRONTEND_ROOT to use another unpacked frontend (its static/ folder) instead.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SITE = REPO / ".site"
PLAYWRIGHT = "playwright-core@1.65.1"
STACKED = "SDAccel-stacked-cast-compile-deepcache-lora.json"
sys.path.insert(0, str(HERE))
from fixtures import CHECKPOINT, LORA  # noqa: E402  (no ComfyUI import at module level)

RUN_OVERRIDES = {  # what a user with the small test model would change in the example workflow
    "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 4},
    "SDAccelLoRAHotSwap": {"lora_name": LORA},
}
RERUN_OVERRIDES = {  # then queued again: a new seed and LoRA strength must not recompile
    "KSampler": {"seed": 7},
    "SDAccelLoRAHotSwap": {"strength_model": 0.5},
}
VUE_OVERRIDES = {"KSampler": {"seed": 11}}  # last, reloaded under Nodes 2.0 (RUN_OVERRIDES + this)


def fail(msg: str) -> None:
    print(f"BROWSER TEST FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def comfy_root() -> Path:
    value = os.environ.get("COMFYUI_PATH")
    if not value or not (Path(value) / "main.py").is_file():
        fail("COMFYUI_PATH is not set to a ComfyUI checkout (it needs main.py); see docs/testing.md")
    return Path(value).resolve()


def ensure_playwright() -> None:
    if (HERE / "node_modules" / "playwright-core").is_dir():
        return
    if not shutil.which("npm"):
        fail("npm is missing: install node and npm (apt-get install -y nodejs npm)")
    subprocess.run(["npm", "install", "--no-save", "--no-package-lock", "--prefix", str(HERE), PLAYWRIGHT], check=True)


def frontend_root(root: Path) -> Path:
    """The static frontend ComfyUI at `root` pins, unpacked under .site/ (pip, no dependencies)."""
    if os.environ.get("COMFYUI_FRONTEND_ROOT"):
        return Path(os.environ["COMFYUI_FRONTEND_ROOT"])
    m = re.search(r"^comfyui-frontend-package==(\S+)", (root / "requirements.txt").read_text(), re.M)
    if not m:
        fail(f"no comfyui-frontend-package pin in {root / 'requirements.txt'}; set COMFYUI_FRONTEND_ROOT")
    target = SITE / f"fe-{m.group(1)}"
    static = target / "comfyui_frontend_package" / "static"
    if not static.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        f"comfyui-frontend-package=={m.group(1)}"], check=True)
    return static


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Frontend 1.27 builds a model-file -> loader table from these core nodes and throws while
# creating *any* node with a model combo (CheckpointLoaderSimple, our LoRA node) when one is
# absent. On CPU machines without torchvision, UpscaleModelLoader fails to import, so the test
# base gets stand-ins for whichever are missing (never registered when the real ones exist).
FRONTEND_MODEL_LOADERS = ("CheckpointLoaderSimple", "ImageOnlyCheckpointLoader", "LoraLoader", "LoraLoaderModelOnly",
                          "VAELoader", "ControlNetLoader", "UNETLoader", "UpscaleModelLoader", "StyleModelLoader", "GLIGENLoader")
STAND_INS = f'''"""Browser test only: stand-ins for core loaders the frontend expects (see run_browser_test.py)."""
import nodes


class _StandIn:
    CATEGORY = "sdaccel browser test"
    RETURN_TYPES = ()
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{}}}}

    def run(self):
        raise RuntimeError("stand-in for a core node that failed to import on this machine")


NODE_CLASS_MAPPINGS = dict((n, type(n, (_StandIn,), {{}})) for n in {FRONTEND_MODEL_LOADERS!r} if n not in nodes.NODE_CLASS_MAPPINGS)
'''


def prepare_base(root: Path, base: Path) -> None:
    models = SITE / "browser-models"  # cached across runs: writing 600 MB of weights takes a while
    subprocess.run([sys.executable, str(HERE / "fixtures.py"), str(models)], check=True,
                   env={**os.environ, "COMFYUI_PATH": str(root)}, stdout=subprocess.DEVNULL)
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "sd-accel").symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / "sdaccel_browser_test_stand_ins.py").write_text(STAND_INS)
    (base / "models").symlink_to(models, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    # No first-run template browser over the canvas.
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))


def start_comfy(root: Path, base: Path, front: Path, port: int, log: Path) -> subprocess.Popen:
    # The torchvision stand-ins (CPU machines, see docs/testing.md) go last on sys.path.
    launcher = ("import runpy, sys; stubs = sys.argv.pop(1); sys.path.append(stubs); "
                "sys.argv[0] = 'main.py'; runpy.run_path('main.py', run_name='__main__')")
    cmd = [sys.executable, "-c", launcher, str(root / "_cpu_stubs"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--front-end-root", str(front), "--disable-auto-launch", "--disable-api-nodes"]
    return subprocess.Popen(cmd, cwd=root, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 240) -> None:
    url = f"http://127.0.0.1:{port}/object_info/SDAccelCompileUNet"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            fail(f"ComfyUI exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if "SDAccelCompileUNet" in r.read().decode():
                    return
        except OSError:
            pass
        time.sleep(2)
    fail(f"ComfyUI did not serve SDAccelCompileUNet within {timeout:.0f} s; see {log}")


def browser(cfg: dict, out: Path, name: str, timeout: float) -> dict:
    cfg_path = out / f"{name}.config.json"
    cfg_path.write_text(json.dumps(cfg))
    proc = subprocess.run(["node", str(HERE / "browser_test.mjs"), str(cfg_path)], capture_output=True, text=True, timeout=timeout)
    (out / f"{name}.node.log").write_text(proc.stdout + proc.stderr)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        fail(f"the browser script printed no result (exit {proc.returncode}); see {out / f'{name}.node.log'}")
    result = json.loads(line[len("RESULT "):])
    (out / f"{name}.result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    if not result.get("ok"):
        fail(f"{name}: {result.get('error')}")
    return result


def check_run(result: dict) -> list[str]:
    problems = []
    final = result.get("final")
    if not result.get("extensionLoaded"):
        problems.append("the sdaccel.status extension was not registered in the frontend")
    if not final:
        return problems + ["the run did not finish before the timeout"]
    if not any(t.startswith("SD Accel") for t in result.get("toasts", [])):
        problems.append(f"no SD Accel toast showed during the first run: {result.get('toasts')}")
    if final["done"] != "execution_success":
        problems.append(f"the prompt ended with {final['done']}: {final.get('error')}")
    names = [e["name"] for e in result["events"]]
    for needed in ("sdaccel.node_applied", "sdaccel.compile_start", "sdaccel.run_stats"):
        if needed not in names:
            problems.append(f"no {needed} event reached the page")
    # A node's badges: the frontend's own (the pack name) and ours.
    ours = {b["type"]: [t for t in b["badges"] if t != "sd-accel"] for b in final["badges"]}
    compile_badges = ours.get("SDAccelCompileUNet", [])
    if not any(re.match(r"^(✓|⚠|✗) .*\d (it/s|s/it)", t) for t in compile_badges):
        problems.append(f"the Compile UNet badge shows no final state with a rate: {compile_badges!r}")
    for node_type, texts in ours.items():
        if not texts:
            problems.append(f"{node_type} shows no SD Accel badge")
    if "SDAccelDeepCache" in ours and not any("DeepCache" in t for t in ours["SDAccelDeepCache"]):
        problems.append(f"the DeepCache badge shows no hit ratio: {ours['SDAccelDeepCache']!r}")
    compiled = sum(e["detail"].get("compile_seconds_in_run", 0) for e in result["events"] if e["name"] == "sdaccel.run_stats")
    texts = (result.get("sawCompiling") or {}).get("texts", [])
    if compiled > 5 and len(texts) < 2:
        problems.append(f"the compiling badge did not count up during {compiled:.0f} s of compiling: {texts}")
    rerun = result.get("rerun")
    if not rerun or not rerun.get("final"):
        return problems + ["the second run (new seed and LoRA strength) did not finish"]
    names = [e["name"] for e in rerun["events"]]
    if rerun["final"]["done"] != "execution_success":
        problems.append(f"the second run ended with {rerun['final']['done']}: {rerun['final'].get('error')}")
    elif "sdaccel.compile_start" in names:
        problems.append("the second run recompiled (a new seed and LoRA strength must not)")
    elif "sdaccel.run_stats" not in names:
        problems.append("the second run sent no run_stats")
    return problems + check_click("classic canvas", result.get("canvasClick")) + check_vue(result.get("vue"))


def check_vue(vue: dict | None) -> list[str]:
    """Nodes 2.0: every badge text our getter returns must be in that node's DOM."""
    if vue is None or vue.get("skipped"):
        return []
    if not vue.get("final") or vue["final"]["done"] != "execution_success":
        return [f"the Nodes 2.0 run did not finish: {(vue.get('final') or {}).get('done')}"]
    problems = []
    if "sdaccel.compile_start" in [e["name"] for e in vue["events"]]:
        problems.append("the Nodes 2.0 run recompiled")
    for b in vue["badgesNow"]:
        ours = [t for t in b["badges"] if t != "sd-accel"]
        dom = vue["dom"].get(b["id"])
        if dom is None:
            problems.append(f"Nodes 2.0 rendered no element for {b['type']} (node {b['id']})")
        elif not ours:
            problems.append(f"{b['type']} has no SD Accel badge after the Nodes 2.0 run")
        elif not all(t in dom for t in ours):
            problems.append(f"Nodes 2.0 shows a stale badge on {b['type']}: wants {ours!r}, the DOM has {dom!r}")
    return problems + check_click("Nodes 2.0", vue.get("click"))


def check_click(where: str, click: dict | None) -> list[str]:
    """A click on the (played) partial-compile badge must show its reasons as a toast."""
    if click is None or click.get("skipped"):
        return []
    if click.get("error"):
        return [f"{where}: {click['error']}"]
    if not any(t.startswith("SD Accel: ⚠ partial") and "reason played by the browser test" in t for t in click.get("toasts", [])):
        return [f"{where}: a click on the partial badge showed no toast with the reasons: {click.get('toasts')}"]
    return []


def rate_of(run: dict) -> str:
    stats = [e["detail"] for e in run.get("events", []) if e["name"] == "sdaccel.run_stats"]
    if not stats:
        return "no run_stats"
    s = stats[-1]
    return f"{s['steps']} steps in {s['seconds']:.1f} s ({s['its']:.3f} it/s), {s['compile_seconds_in_run']:.0f} s of it compiling"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workflow", default=str(REPO / "example_workflows" / STACKED))
    ap.add_argument("--out", default=str(SITE / "browser-test"))
    ap.add_argument("--timeout", type=float, default=900, help="seconds the queued run may take")
    ap.add_argument("--build-workflows", action="store_true", help="regenerate example_workflows/ from workflow_specs.mjs")
    ap.add_argument("--keep", action="store_true", help="leave the temp base directory in place")
    ap.add_argument("--set", action="append", default=[], metavar="NODETYPE.WIDGET=JSON",
                    help="another widget override for the run, e.g. SDAccelCompileUNet.fullgraph=true (shows the fallback path)")
    args = ap.parse_args()
    overrides = {k: dict(v) for k, v in RUN_OVERRIDES.items()}
    for item in args.set:
        target, _, value = item.partition("=")
        node_type, _, widget = target.partition(".")
        overrides.setdefault(node_type, {})[widget] = json.loads(value)

    root = comfy_root()
    if not Path("/usr/bin/chromium").exists():
        fail("/usr/bin/chromium is missing: apt-get install -y chromium")
    ensure_playwright()
    front = frontend_root(root)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="sdaccel-browser-"))
    port = free_port()
    log = out / "comfyui.log"
    prepare_base(root, base)
    proc = start_comfy(root, base, front, port, log)
    t0 = time.time()
    try:
        wait_ready(proc, port, log)
        print(f"ComfyUI ({root.name}) up on port {port} after {time.time() - t0:.0f} s; frontend {front}")
        common = {"url": f"http://127.0.0.1:{port}/", "outDir": str(out), "workflowsDir": str(REPO / "example_workflows")}
        if args.build_workflows:
            result = browser({**common, "mode": "build"}, out, "build", 600)
            for w in result["written"]:
                print("  ", w)
            return
        checked = browser({**common, "mode": "check"}, out, "check", 600)
        problems = []
        for w in checked["workflows"]:
            print(f"   {w['file']}: {w['nodes']} nodes, {w['promptNodes']} in the prompt"
                  + (f", MISSING {w['missing']}" if w["missing"] else "") + (f", BROKEN {w['broken']}" if w["broken"] else ""))
            if w["missing"] or w["broken"] or w["promptNodes"] != w["nodes"]:
                problems.append(f"{w['file']} does not load: missing {w['missing']}, broken {w['broken']}")
        run = browser({**common, "mode": "run", "workflow": args.workflow, "overrides": overrides,
                       "rerun": RERUN_OVERRIDES, "vueRun": VUE_OVERRIDES, "timeoutS": args.timeout},
                      out, "run", 3 * args.timeout + 300)
        problems += check_run(run)
        print(f"frontend {run.get('frontend')}")
        vue = run.get("vue") or {}
        if vue.get("skipped"):
            print(f"Nodes 2.0 run: skipped, {vue['skipped']}")
        click = run.get("canvasClick") or {}
        print(f"click on a canvas badge: {click.get('skipped') or click.get('error') or click.get('toasts')}")
        for label, r in (("first run", run), ("second run", run.get("rerun")), ("Nodes 2.0 run (reloaded, new seed)", vue)):
            if not r or r.get("skipped"):
                continue
            print(f"{label}: prompt took {r['seconds']:.0f} s; sampling: {rate_of(r)}")
            if r.get("sawCompiling"):
                texts = r["sawCompiling"].get("texts", [])
                print(f"   compiling badge from {r['sawCompiling']['afterS']:.0f} s in: {texts[:2]} ... {texts[-2:]} ({len(texts)} states)")
            for b in (r.get("final") or {}).get("badges", []):
                print(f"   {b['type']}: {' | '.join(b['badges'])}")
            for node_id, text in (r.get("dom") or {}).items():
                print(f"   DOM of node {node_id}: {text}")
            for t in (r.get("click") or {}).get("toasts", []):
                print(f"   toast after a click on the badge: {t}")
            for t in r.get("toasts", []):
                print(f"   toast: {t}")
        print(f"   screenshots: {out}/final-compiling.png, final.png, final-chain.png, rerun.png, canvas-click.png, vue.png, vue-click.png")
        if problems:
            fail("; ".join(problems))
        print("browser test passed")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
