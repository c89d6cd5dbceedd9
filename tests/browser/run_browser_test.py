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

Needs: COMFYUI_PATH with ComfyUI's Python requirements; /usr/bin/chromium (`apt-get install -y
chromium`); node and npm. playwright-core (npm) and the frontend version ComfyUI pins (pip,
`comfyui-frontend-package`, static files only) are installed on first use into git-ignored
folders. Set COMFYUI_FRONTEND_ROOT to use an unpacked frontend instead.
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


def fail(msg: str) -> None:
    print(f"BROWSER TEST FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def comfy_root() -> Path:
    value = os.environ.get("COMFYUI_PATH")
    if not value or not (Path(value) / "main.py").is_file():
        fail("COMFYUI_PATH is not set to a ComfyUI checkout (it needs main.py); see DESIGN.md, Tests")
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


def prepare_base(root: Path, base: Path) -> None:
    models = SITE / "browser-models"  # cached across runs: writing 600 MB of weights takes a while
    subprocess.run([sys.executable, str(HERE / "fixtures.py"), str(models)], check=True,
                   env={**os.environ, "COMFYUI_PATH": str(root)}, stdout=subprocess.DEVNULL)
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "sd-accel").symlink_to(REPO, target_is_directory=True)
    (base / "models").symlink_to(models, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    # No first-run template browser over the canvas.
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))


def start_comfy(root: Path, base: Path, front: Path, port: int, log: Path) -> subprocess.Popen:
    # The torchvision stub (CPU machines, see DESIGN.md) goes last on sys.path.
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
    if final["done"] != "execution_success":
        problems.append(f"the prompt ended with {final['done']}: {final.get('error')}")
    names = [e["name"] for e in result["events"]]
    for needed in ("sdaccel.node_applied", "sdaccel.compile_start", "sdaccel.run_stats"):
        if needed not in names:
            problems.append(f"no {needed} event reached the page")
    badges = {b["type"]: " | ".join(b["badges"]) for b in final["badges"]}
    compile_badge = badges.get("SDAccelCompileUNet", "")
    if not re.match(r"^(✓|⚠|✗) .*\d it/s|^(✓|⚠|✗) .*s/it", compile_badge):
        problems.append(f"the Compile UNet badge shows no final state with a rate: {compile_badge!r}")
    for node_type, text in badges.items():
        if not text:
            problems.append(f"{node_type} shows no badge")
    if "SDAccelDeepCache" in badges and "DeepCache" not in badges["SDAccelDeepCache"]:
        problems.append(f"the DeepCache badge shows no hit ratio: {badges['SDAccelDeepCache']!r}")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workflow", default=str(REPO / "example_workflows" / STACKED))
    ap.add_argument("--out", default=str(SITE / "browser-test"))
    ap.add_argument("--timeout", type=float, default=900, help="seconds the queued run may take")
    ap.add_argument("--build-workflows", action="store_true", help="regenerate example_workflows/ from workflow_specs.mjs")
    ap.add_argument("--keep", action="store_true", help="leave the temp base directory in place")
    args = ap.parse_args()

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
            print(f"   {w['file']}: {w['nodes']} nodes, {w['promptNodes']} in the prompt" + (f", MISSING {w['missing']}" if w["missing"] else ""))
            if w["missing"] or not w["promptNodes"]:
                problems.append(f"{w['file']} does not load: missing node types {w['missing']}")
        run = browser({**common, "mode": "run", "workflow": args.workflow, "overrides": RUN_OVERRIDES,
                       "timeoutS": args.timeout}, out, "run", args.timeout + 300)
        problems += check_run(run)
        print(f"frontend {run.get('frontend')}; queued run took {run['seconds']:.0f} s")
        if run.get("sawCompiling"):
            print(f"   while compiling ({run['sawCompiling']['afterS']:.0f} s in): {run['sawCompiling']['badges']}")
        for b in (run.get("final") or {}).get("badges", []):
            print(f"   {b['type']}: {' | '.join(b['badges'])}")
        for t in run.get("toasts", []):
            print(f"   toast: {t}")
        print(f"   screenshots: {out / 'compiling.png'}, {out / 'final.png'}")
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
