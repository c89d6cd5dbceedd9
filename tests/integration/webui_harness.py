"""Boot a real stable-diffusion-webui (A1111 1.10.1) or Forge in-process on a CPU, for the SD Accel extension tests.

What is real: the webui's own start-up (`modules.initialize.imports()` / `initialize()`), its
extension and script loader (SD Accel is linked into a temporary data dir's `extensions/`),
its gradio UI (`modules.ui.create_ui()`, gradio 3.41.2 / 4.40.0), its processing pipeline
(`processing.process_images`: prompt parsing, the CLIP text encoder with the webui's hijack,
k-diffusion samplers, the VAE, infotext), and for A1111 its `ldm` LatentDiffusion and
UNetModel from repositories/stable-diffusion-stability-ai at the commit webui 1.10 pins.

What is not: model weights (none can be downloaded here). The model is built in-process
from tiny configs of the real classes with seeded random weights (UNet 32 channels, VAE 32
channels, a 2-layer CLIP text model with the real CLIP tokenizer files), and handed to the
webui the way its loader would (`shared.sd_model = m`, `sd_hijack.model_hijack.hijack(m)`,
`model_loaded_callback`); `sd_models.reload_model_weights` is replaced by "keep this model".

Stand-ins (CPU only): torchvision has no CPU build here, and the webui imports it through
open_clip, k-diffusion, sgm, torchmetrics, facexlib. `write_torchvision_standin` writes a
package whose names resolve at import time and raise ImportError when used (nothing the
tests run uses torchvision); transformers' classes are imported before it goes on sys.path,
so transformers itself sees no torchvision.

Environment: the webui's Python requirements (gradio etc.) in a venv that sees the system
torch, see docs/webui.md "Tests". Without them, or without WEBUI_A1111_PATH /
WEBUI_FORGE_PATH, the tests skip with the reason.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXTENSION = "sd-accel"  # the folder name under extensions/ (metadata.ini names the extension the same)

STANDIN = '''"""CPU test stand-in for torchvision: names resolve, using one raises ImportError."""


class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Meta(f"{cls.__name__}.{name}", (_Unavailable,), {})


class _Unavailable(metaclass=_Meta):
    def __init__(self, *a, **k):
        raise ImportError(f"torchvision is not installed; {type(self).__name__} is a CPU test stand-in")


def module_getattr(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Meta(name, (_Unavailable,), {})
'''
SUBMODULES = ("ops", "ops.misc", "transforms", "transforms.functional", "models", "models._utils", "utils", "io", "datasets")


def write_torchvision_standin(dest: Path) -> Path:
    pkg = dest / "torchvision"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "_standin.py").write_text(STANDIN)
    for sub in SUBMODULES:
        path = pkg.joinpath(*sub.split("."))
        path.mkdir(parents=True, exist_ok=True)
        depth = "." * (sub.count(".") + 2)
        children = [s.split(".")[-1] for s in SUBMODULES if s.startswith(sub + ".") and s.count(".") == sub.count(".") + 1]
        imports = f"from . import {', '.join(children)}  # noqa\n" if children else ""
        (path / "__init__.py").write_text(f"{imports}from {depth}_standin import module_getattr as __getattr__  # noqa\n")
    top = [s for s in SUBMODULES if "." not in s]
    (pkg / "__init__.py").write_text(f"from . import {', '.join(top)}  # noqa\nfrom ._standin import module_getattr as __getattr__  # noqa\n")
    # torchmetrics checks the version through package metadata.
    dist = dest / "torchvision-0.0.0+standin.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.0.0+standin\n")
    return dest


# --- set-up: the commands docs/webui.md shows, and the checks that name them when something is missing ------------

A1111_R = ".hosts/webui-a1111-1.10.1/repositories"
SETUP = {
    "a1111": {
        "env": "WEBUI_A1111_PATH", "label": "AUTOMATIC1111 1.10.1", "path": ".hosts/webui-a1111-1.10.1", "venv": ".hosts/venv-a1111",
        "test": "tests/integration/test_webui_a1111.py",
        "tree": ["git clone --depth 1 --branch v1.10.1 https://github.com/AUTOMATIC1111/stable-diffusion-webui .hosts/webui-a1111-1.10.1"],
        "repositories": {
            "stable-diffusion-stability-ai/ldm": [
                f"git clone https://github.com/Stability-AI/stablediffusion {A1111_R}/stable-diffusion-stability-ai",
                f"git -C {A1111_R}/stable-diffusion-stability-ai checkout cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf"],
            "generative-models/sgm": [
                f"git clone https://github.com/Stability-AI/generative-models {A1111_R}/generative-models",
                f"git -C {A1111_R}/generative-models checkout 45c443b316737a4ab6e40413d7794a7f5657c19f"],
            "k-diffusion/k_diffusion": [
                f"git clone https://github.com/crowsonkb/k-diffusion {A1111_R}/k-diffusion",
                f"git -C {A1111_R}/k-diffusion checkout ab527a9a6d347f364e3d185ba6d714e22d80cb3c"],
        },
        "venv_lines": [
            "python3 -m venv --system-site-packages .hosts/venv-a1111",
            ".hosts/venv-a1111/bin/pip install -c constraints-cpu.txt gradio==3.41.2 fastapi==0.94.0 httpx==0.24.1 omegaconf==2.2.3 "
            "pytorch_lightning==1.9.4 \"setuptools<81\" transformers==4.30.2 \"tokenizers<0.14\" \"huggingface-hub<1.0\" diskcache GitPython "
            "jsonmerge inflection piexif lark blendmodes opencv-python-headless scikit-image",
            ".hosts/venv-a1111/bin/pip install --no-deps torchmetrics==0.11.4 open-clip-torch==2.20.0 openai-clip ftfy timm==0.9.2 "
            "pillow-avif-plugin resize-right torchdiffeq tomesd clean-fid kornia==0.6.7 spandrel==0.3.4 facexlib diffusers==0.31.0 "
            "peft==0.6.2 accelerate==0.21.0",
        ],
    },
    "forge": {
        "env": "WEBUI_FORGE_PATH", "label": "Forge (June 2025)", "path": ".hosts/webui-forge", "venv": ".hosts/venv-forge",
        "test": "tests/integration/test_webui_forge.py",
        "modules": {"sentencepiece": "sentencepiece"},  # Forge's bundled gguf imports it at start-up
        "tree": ["git clone https://github.com/lllyasviel/stable-diffusion-webui-forge .hosts/webui-forge",
                 "git -C .hosts/webui-forge checkout dfdcbab"],
        "repositories": {
            "huggingface_guess/huggingface_guess": [
                "git clone https://github.com/lllyasviel/huggingface_guess .hosts/webui-forge/repositories/huggingface_guess",
                "git -C .hosts/webui-forge/repositories/huggingface_guess checkout 84826248b49bb7ca754c73293299c4d4e23a548d"],
        },
        "venv_lines": [
            "python3 -m venv --system-site-packages .hosts/venv-forge",
            ".hosts/venv-forge/bin/pip install -c constraints-cpu.txt gradio==4.40.0 fastapi==0.104.1 pydantic==2.8.2 httpx==0.24.1 "
            "omegaconf==2.2.3 pytorch_lightning==1.9.4 \"setuptools<81\" transformers==4.46.1 huggingface-hub==0.26.2 diffusers==0.31.0 "
            "peft==0.13.2 accelerate==0.31.0 diskcache GitPython jsonmerge inflection piexif lark blendmodes opencv-python-headless "
            "scikit-image gradio_rangeslider==0.0.6 gradio_imageslider==0.0.20 loadimg==0.1.2 sentencepiece",
            ".hosts/venv-forge/bin/pip install --no-deps torchmetrics==0.11.4 open-clip-torch==2.20.0 ftfy timm==0.9.2 pillow-avif-plugin "
            "resize-right torchdiffeq tomesd clean-fid kornia==0.6.7 spandrel==0.3.4 spandrel-extra-arches==0.1.1 facexlib",
        ],
    },
    "neo": {
        # Neo vendors huggingface_guess, k_diffusion and gguf (modules_forge/packages): no repositories/ to clone.
        "env": "WEBUI_NEO_PATH", "label": "Forge Neo", "path": ".hosts/webui-neo", "venv": ".hosts/venv-neo",
        "test": "tests/integration/test_webui_neo.py",
        "tree": ["git clone --depth 1 --branch neo https://github.com/Haoming02/sd-webui-forge-classic .hosts/webui-neo"],
        "repositories": {},
        "requirements_less": ("setuptools",),  # its requirements.txt is installed, all but these pins
        "venv_lines": [
            "python3.13 -m venv .hosts/venv-neo",
            # In the order of Neo's own launcher (torch, then gradio, then requirements.txt, which moves Pillow past
            # gradio's pin), without its setuptools 69 pin: torch 2.13 needs setuptools >= 77.
            ".hosts/venv-neo/bin/pip install -c constraints-cpu.txt torch==2.13.0 torchvision==0.28.0",
            ".hosts/venv-neo/bin/pip install -c constraints-cpu.txt gradio==4.40.0 gradio_rangeslider==0.0.8",
            "grep -v '^setuptools==' .hosts/webui-neo/requirements.txt > .hosts/neo-requirements.txt",
            ".hosts/venv-neo/bin/pip install -c constraints-cpu.txt -r .hosts/neo-requirements.txt \"pytest>=7\"",
        ],
    },
}
# What the webuis import at start-up that a wrong interpreter lacks (the pins below are checked too).
_MODULES = ("gradio", "omegaconf", "cv2", "skimage", "transformers", "diffusers", "safetensors")
_PIN = re.compile(r"(?<![\w.-])([A-Za-z][A-Za-z0-9_.-]*)==([0-9][0-9A-Za-z.]*)")


def run_command(kind: str) -> str:
    s = SETUP[kind]
    return f"{s['env']}={s['path']} {s['venv']}/bin/python -m pytest -c tests/pytest.ini {s['test']}"


def setup_lines(kind: str) -> list[str]:
    """The whole set-up for `kind`, in order, as docs/webui.md shows it (the last line runs the tests)."""
    s = SETUP[kind]
    return [*s["tree"], *(line for lines in s["repositories"].values() for line in lines), *s["venv_lines"], run_command(kind)]


def pins(kind: str, path: Path | None = None) -> dict[str, str]:
    """Distribution -> version pinned with == by the set-up: its pip lines, the webui's own requirements.txt where
    the set-up installs it (read from the tree at `path`, less what the set-up leaves out), and torch from constraints-cpu.txt."""
    out = {"torch": (REPO / "constraints-cpu.txt").read_text().split("==", 1)[1].split()[0]}
    s = SETUP[kind]
    for line in s["venv_lines"]:
        if "pip install" in line:
            out.update({m.group(1): m.group(2) for m in _PIN.finditer(line)})
    req = path / "requirements.txt" if path is not None and s.get("requirements_less") is not None else None
    if req is not None and req.is_file():
        for entry in req.read_text().splitlines():
            m = _PIN.match(entry.strip())
            if m and ";" not in entry and m.group(1) not in out and m.group(1) not in s["requirements_less"]:
                out[m.group(1)] = m.group(2)
    return out


def root(kind: str) -> Path | None:
    value = os.environ.get(SETUP[kind]["env"])
    if not value:
        return None
    path = Path(value).resolve()
    if not (path / "modules").is_dir() and (path / "webui" / "modules").is_dir():
        path = path / "webui"  # a packaged Neo (e.g. exo101/sd-webui-forge-neo-v3) keeps the webui in webui/
    return path


def _run(lines) -> str:
    return " && ".join(lines)


def skip_reason(kind: str) -> str | None:
    """Why the `kind` tests cannot run here, with the exact command that sets up what is missing; None when they can."""
    s = SETUP[kind]
    env = s["env"]
    path = root(kind)
    if path is None:
        return (f"{env} is not set: these tests need a {s['label']} source tree and its venv. Set up (from the repository root; "
                f"docs/webui.md \"Tests\"): {_run(setup_lines(kind))}")
    if not (path / "modules" / "initialize.py").is_file():
        return f"{env}={path} is not a webui checkout (no modules/initialize.py). Get one with: {_run(s['tree'])}"
    for marker, lines in s["repositories"].items():
        if not (path / "repositories" / marker).is_dir():
            return (f"{path}/repositories/{marker.split('/')[0]} is missing (the webui clones it at start-up; these tests skip that step). "
                    f"Run: {_run(l.replace(s['path'], str(path)) for l in lines)}")
    venv_cmd = _run(s["venv_lines"]).replace(s["path"], str(path))
    for module in _MODULES:
        if importlib.util.find_spec(module) is None:
            return (f"the {s['label']} packages are not in this Python ({sys.executable}: no {module}). Make its venv and run the tests "
                    f"with it: {venv_cmd} && {run_command(kind).replace(s['path'], str(path))}")
    for module, dist in s.get("modules", {}).items():  # one package the venv may lack: name it and its install line
        if importlib.util.find_spec(module) is None:
            return (f"this Python ({sys.executable}) lacks {module}, which {s['label']} imports at start-up. "
                    f"Install it with: {s['venv']}/bin/pip install -c constraints-cpu.txt {dist}")
    wrong = []
    for dist, want in pins(kind, path).items():
        try:
            got = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            got = None
        if got is None or got.split("+")[0] != want:
            wrong.append(f"{dist} {got or 'missing'} (expected {want})")
    if wrong:
        return (f"this Python ({sys.executable}) has other versions than the {s['label']} set-up pins: {', '.join(wrong)}. "
                f"Install the pins with: {venv_cmd}")
    if kind == "a1111":
        try:
            _tokenizer_files()
        except FileNotFoundError as e:
            return str(e)
    return None


def clip_dir(dest: Path, hidden: int = 32) -> Path:
    """A tiny CLIP text model (seeded) next to the real CLIP tokenizer files, loadable by from_pretrained."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = _tokenizer_files()
    dest.mkdir(parents=True, exist_ok=True)
    for f in tok.iterdir():
        shutil.copy(f, dest)
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2, num_hidden_layers=2,
                                 vocab_size=49408, max_position_embeddings=77)).save_pretrained(dest, safe_serialization=True)
    return dest


def _tokenizer_files() -> Path:
    # The CLIP tokenizer files (vocab.json, merges.txt): ComfyUI ships them, and so do Forge and Neo (for SD1.5);
    # the hub is not reachable from the tests.
    trees = [Path(os.environ[e]) for e in ("COMFYUI_PATH", "WEBUI_FORGE_PATH", "WEBUI_NEO_PATH") if os.environ.get(e)]
    trees += sorted((REPO / ".hosts").glob("ComfyUI-*")) + sorted((REPO / ".hosts").glob("webui-*"))
    for tree in trees:
        for sub in ("comfy/sd1_tokenizer", "backend/huggingface/runwayml/stable-diffusion-v1-5/tokenizer",
                    "webui/backend/huggingface/runwayml/stable-diffusion-v1-5/tokenizer"):
            d = tree / sub
            if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
                return d
    raise FileNotFoundError("A1111's tiny model needs the CLIP tokenizer files (vocab.json, merges.txt), which ComfyUI, Forge and Neo "
                            "ship. Get a ComfyUI tree with: git clone --depth 1 --branch v0.3.64 https://github.com/Comfy-Org/ComfyUI "
                            ".hosts/ComfyUI-0.3.64 (or set COMFYUI_PATH, WEBUI_FORGE_PATH or WEBUI_NEO_PATH to a tree you have)")


class Webui:
    """The booted webui: its modules, and helpers to make a model and run a generation."""

    def __init__(self, kind: str, path: Path, data_dir: Path):
        self.kind, self.path, self.data_dir = kind, path, data_dir
        self.m = types.SimpleNamespace()

    def mod(self, name: str):
        return importlib.import_module(f"modules.{name}")

    @property
    def extension_dir(self) -> Path:
        return self.data_dir / "extensions" / EXTENSION

    def is_ours(self, path: str) -> bool:
        """Whether a script path the webui reports is one of SD Accel's, by folder (not by a name that a checkout may share)."""
        p = Path(os.path.abspath(path))
        return p.parent == self.extension_dir / "scripts" or p.resolve().parent == REPO / "scripts"

    @property
    def our_script(self):
        runner = self.mod("scripts").scripts_txt2img
        return next(s for s in runner.alwayson_scripts if s.title() == "SD Accel")

    def script_globals(self) -> dict:
        """The globals of scripts/sd_accel_script.py as the webui loaded it (by path, outside sys.modules)."""
        return type(self.our_script).ui.__globals__

    def default_args(self, runner) -> list:
        import gradio as gr

        args = [None] * max(s.args_to for s in runner.scripts)
        args[0] = 0
        with gr.Blocks():
            for s in runner.scripts:
                values = s.ui(s.is_img2img)
                if values:
                    args[s.args_from:s.args_to] = [c.value for c in values]
        return args

    def script(self, class_name: str):
        """An always-on txt2img script of the webui by its class name (titles are translated in some copies), or None."""
        runner = self.mod("scripts").scripts_txt2img
        return next((s for s in runner.alwayson_scripts if type(s).__name__ == class_name), None)

    def txt2img(self, sd_accel: list | None = None, *, steps=4, sampler="Euler", seed=1234, width=64, height=64, prompt="a red cat",
                cfg_scale=5.0, scripts_args: dict | None = None, **fields):
        """One txt2img generation through processing.process_images, SD Accel's accordion set to `sd_accel` (UI_FIELDS order);
        `scripts_args`: other always-on scripts' values, by class name (e.g. Neo's compile script)."""
        processing, scripts = self.mod("processing"), self.mod("scripts")
        runner = scripts.scripts_txt2img
        p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, negative_prompt="blurry", steps=steps, sampler_name=sampler, cfg_scale=cfg_scale,
                                                        width=width, height=height, seed=seed, do_not_save_samples=True, do_not_save_grid=True,
                                                        n_iter=1, batch_size=1, **fields)
        p.scripts = runner
        args = self.default_args(runner)
        for s in runner.alwayson_scripts:
            # The built-in Sampler and Seed scripts (webui >= 1.9) set p.steps / p.seed from their own args.
            if s.title() == "Sampler":
                args[s.args_from:s.args_from + 2] = [steps, sampler]
            elif s.title() == "Seed":
                args[s.args_from] = seed
        if sd_accel is not None:
            ours = self.our_script
            args[ours.args_from:ours.args_to] = sd_accel
        for name, values in (scripts_args or {}).items():
            other = self.script(name)
            args[other.args_from:other.args_from + len(values)] = values
        p.script_args = args
        for hook in getattr(self, "before_run", ()):
            hook(p)
        return p, processing.process_images(p)

    def api_txt2img(self, sd_accel: list, *, steps=4, sampler="Euler", seed=1234, width=64, height=64, prompt="a red cat", cfg_scale=5.0):
        """The same generation as txt2img, through the webui's own HTTP API handler (Api.text2imgapi), SD Accel's
        values sent as an API client sends them (alwayson_scripts; the API fills what is missing with the
        accordion's defaults). Returns (the infotext, the image as float64 array)."""
        import json
        import threading

        import numpy as np
        from fastapi import FastAPI

        api, models = self.mod("api.api"), self.mod("api.models")
        req = models.StableDiffusionTxt2ImgProcessingAPI(prompt=prompt, negative_prompt="blurry", steps=steps, sampler_name=sampler, seed=seed,
                                                         cfg_scale=cfg_scale, width=width, height=height,
                                                         alwayson_scripts={self.our_script.title(): {"args": list(sd_accel)}})
        res = api.Api(FastAPI(), threading.Lock()).text2imgapi(req)
        return json.loads(res.info)["infotexts"][0], np.asarray(api.decode_base64_to_image(res.images[0])).astype(np.float64)

    def check_old_api_call(self, sent: list, expect: str, steps: int = 9) -> None:
        """An API script written for the 13-value accordion (before the Step Cache's controls) still works: the
        webui's API fills the other 4 with the accordion's defaults, the infotext has `expect`, and the image is
        the 17 values' image."""
        import numpy as np

        infotext, img = self.api_txt2img(sent[:13], steps=steps)
        assert expect in infotext, infotext
        _, full = self.txt2img(sent, steps=steps)
        assert np.array_equal(img, np.asarray(full.images[0]).astype(np.float64))


_booted: dict = {}


def boot(kind: str, path: Path, data_dir: Path, standin_dir: Path, extra_argv=()) -> Webui:
    """Start the webui in this process (once per process: the webui is a set of module-level singletons)."""
    if _booted and _booted.get("kind") != kind:
        import pytest

        pytest.skip(f"{_booted['kind']} is already running in this process (both use the `modules` package); run the {kind} tests in their own pytest process")
    _booted["kind"] = kind
    # transformers looks for torchvision lazily; import what the webui uses before the stand-in exists.
    import transformers  # noqa: F401
    from transformers import AutoModelForMaskedLM, AutoTokenizer, CLIPTextModel, CLIPTokenizer, PreTrainedModel  # noqa: F401

    if importlib.util.find_spec("torchvision") is None:  # Neo's venv has the real one
        sys.path.insert(0, str(write_torchvision_standin(standin_dir)))
    ext = data_dir / "extensions"
    ext.mkdir(parents=True, exist_ok=True)
    link = ext / EXTENSION
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    os.environ.setdefault("SD_ACCEL_DYNAMO_BACKEND", "eager")
    os.chdir(path)
    sys.path.insert(0, str(path))
    argv = ["webui.py", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--data-dir", str(data_dir), "--skip-version-check"]
    argv += {"a1111": ["--skip-load-model-at-start", "--disable-nan-check", "--no-half", "--use-cpu", "all", "--no-download-sd-model"],
             "forge": ["--skip-load-model-at-start", "--disable-nan-check", "--always-cpu"],
             "neo": ["--skip-python-version-check", "--cpu"]}[kind]
    sys.argv = argv + list(extra_argv)
    if kind == "neo":
        # Neo's webui.py starts its backend (modules_forge/packages on sys.path, devices) before initialize.
        from modules_forge.initialization import initialize_forge

        initialize_forge()
    from modules import initialize

    initialize.imports()
    initialize.check_versions()
    initialize.initialize()
    from modules import script_callbacks, ui

    script_callbacks.before_ui_callback()
    w = Webui(kind, path, data_dir)
    w.demo = ui.create_ui()
    return w


# --- A1111: a tiny LatentDiffusion of the real classes ---------------------------------------------------

def a1111_model(w: Webui, clip: Path):
    import torch
    from ldm.models.diffusion.ddpm import LatentDiffusion

    from modules import devices, script_callbacks, sd_hijack, sd_models, shared

    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1], num_res_blocks=1,
                           channel_mult=[1, 2], num_head_channels=8, use_spatial_transformer=True, transformer_depth=1, context_dim=32,
                           use_linear_in_transformer=True, use_checkpoint=False, legacy=False)}
    vae = {"target": "ldm.models.autoencoder.AutoencoderKL",
           "params": dict(embed_dim=4, monitor=None, lossconfig={"target": "torch.nn.Identity"},
                          ddconfig=dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 1, 1],
                                        num_res_blocks=1, attn_resolutions=[], dropout=0.0))}
    cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "params": dict(version=str(clip), device="cpu")}
    torch.manual_seed(0)
    m = LatentDiffusion(first_stage_config=vae, cond_stage_config=cond, unet_config=unet, linear_start=0.00085, linear_end=0.012,
                        num_timesteps_cond=1, timesteps=1000, first_stage_key="jpg", cond_stage_key="txt", image_size=8, channels=4,
                        cond_stage_trainable=False, conditioning_key="crossattn", scale_factor=0.18215, use_ema=False)
    with torch.no_grad():
        for p in m.model.diffusion_model.parameters():
            if not p.any():
                p.normal_(0, 0.02)  # zero-initialised convs (out, proj_out) would make every output 0
    m.eval()
    info = types.SimpleNamespace(name_for_extra="tiny-sd15", filename=str(w.data_dir / "tiny-sd15.safetensors"), name="tiny-sd15.safetensors",
                                 title="tiny-sd15.safetensors [0000000000]", model_name="tiny-sd15", shorthash="0000000000", hash="00000000",
                                 sha256=None, short_title="tiny-sd15 [0000000000]", ids=[], metadata={})
    m.sd_checkpoint_info, m.sd_model_hash, m.sd_model_checkpoint = info, "00000000", info.filename
    m.is_sdxl = m.is_sd2 = m.is_ssd = m.is_sdxl_inpaint = m.is_sd3 = m.lowvram = m.ztsnr = False
    m.is_sd1, m.latent_channels = True, 4
    # What sd_models.load_model does for --no-half on the CPU, then hand the model over.
    devices.dtype = devices.dtype_unet = devices.dtype_vae = torch.float32
    shared.opts.live_previews_enable = False
    sd_hijack.model_hijack.hijack(m)
    shared.sd_model = m
    script_callbacks.model_loaded_callback(m)
    sd_models.reload_model_weights = lambda *a, **k: shared.sd_model
    torch.set_num_threads(1)  # tiny model, shared CPU: threads only add contention
    return m


# --- Forge: its own SD1.5 engine (backend/diffusion_engine/sd15.py) around tiny components ---------------

def forge_model(w: Webui, unet_dtype=None):
    """Forge's StableDiffusion engine built from tiny components of Forge's own classes, as its loader would hand them over,
    made the webui's current model. Forge and Neo alike; `unet_dtype` (e.g. torch.float8_e4m3fn) stores the UNet's weights
    in that dtype under Forge's manual-cast operations, as its 'Diffusion in Low Bits' does."""
    return use_engine(w, forge_engine(w, unet_dtype))


def forge_engine(w: Webui, unet_dtype=None):
    import torch
    from diffusers import PNDMScheduler
    from huggingface_guess import model_list
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from backend import memory_management
    from backend.args import dynamic_args
    from backend.diffusion_engine.sd15 import StableDiffusion
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.operations import using_forge_operations
    from backend.state_dict import load_state_dict
    from modules import shared
    from transformers import modeling_utils

    repo = w.path / "backend" / "huggingface" / "runwayml" / "stable-diffusion-v1-5"
    cpu = torch.device("cpu")
    unet_config = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2], num_heads=-1, num_head_channels=8,
                       use_spatial_transformer=True, transformer_depth=[1, 1], transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1],
                       context_dim=32, use_linear_in_transformer=False, adm_in_channels=None)
    # As Forge's loader does (backend/loader.py): build under its operations, then load a state dict;
    # the state dicts come from the same classes built plainly with seeded initialisation.
    torch.manual_seed(0)
    plain_unet = IntegratedUNet2DConditionModel.from_config(unet_config)
    with torch.no_grad():
        for p in plain_unet.parameters():
            if not p.any():
                p.normal_(0, 0.02)  # zero-initialised convs would make every output 0
    storage = unet_dtype or torch.float32
    with using_forge_operations(device=cpu, dtype=storage, manual_cast_enabled=storage != torch.float32):
        unet = IntegratedUNet2DConditionModel.from_config(unet_config)
    load_state_dict(unet, plain_unet.state_dict())
    unet._internal_dict = unet_config  # what the loader does for ConfigMixin models
    unet.storage_dtype, unet.computation_dtype = storage, torch.float32
    unet.load_device, unet.initial_device, unet.offload_device = memory_management.get_torch_device(), cpu, memory_management.unet_offload_device()
    vae_config = dict(IntegratedAutoencoderKL.load_config(str(repo / "vae")), block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64)
    with using_forge_operations(device=cpu, dtype=memory_management.vae_dtype()):
        vae = IntegratedAutoencoderKL.from_config(vae_config)
    load_state_dict(vae, IntegratedAutoencoderKL.from_config(vae_config).state_dict())
    te_config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77)
    plain_te = IntegratedCLIP(CLIPTextModel, te_config, add_text_projection=True)
    with modeling_utils.no_init_weights():
        with using_forge_operations(device=cpu, dtype=memory_management.text_encoder_dtype(), manual_cast_enabled=True):
            text_encoder = IntegratedCLIP(CLIPTextModel, te_config, add_text_projection=True).to(device=cpu, dtype=memory_management.text_encoder_dtype())
    load_state_dict(text_encoder, plain_te.state_dict())
    tokenizer = CLIPTokenizer.from_pretrained(str(repo / "tokenizer"))
    scheduler = PNDMScheduler.from_pretrained(str(repo / "scheduler"))
    dynamic_args["embedding_dir"] = shared.cmd_opts.embeddings_dir
    dynamic_args["emphasis_name"] = shared.opts.emphasis
    engine = StableDiffusion(model_list.SD15(unet_config), {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler})
    return engine


def use_engine(w: Webui, engine):
    """Make `engine` the webui's model, as its loader does after loading a checkpoint."""
    import torch

    from modules import processing, script_callbacks, sd_models, shared

    info = types.SimpleNamespace(name_for_extra="tiny-sd15", filename=str(w.data_dir / "tiny-sd15.safetensors"), name="tiny-sd15.safetensors",
                                 title="tiny-sd15.safetensors [0000000000]", model_name="tiny-sd15", shorthash="0000000000", hash="00000000",
                                 sha256=None, short_title="tiny-sd15 [0000000000]", ids=[], metadata={})
    engine.extra_generation_params, engine.comments = {}, []
    engine.sd_checkpoint_info, engine.filename, engine.sd_model_hash = info, info.filename, "00000000"
    sd_models.model_data.set_sd_model(engine)
    shared.opts.data["sd_model_checkpoint"] = info.title  # data, not set(): set() would fire the reload callback
    reload = lambda *a, **k: (engine, False)  # noqa: E731  (keep this model: no checkpoint file to load)
    sd_models.forge_model_reload = processing.forge_model_reload = reload
    script_callbacks.model_loaded_callback(engine)
    shared.opts.live_previews_enable = False
    torch.set_num_threads(1)
    return engine


if __name__ == "__main__":  # python3 tests/integration/webui_harness.py a1111|forge|neo: print that webui's set-up
    print("\n".join(setup_lines(sys.argv[1] if len(sys.argv) > 1 else "neo")))
