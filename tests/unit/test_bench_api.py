"""The public Python API: `sd_accel.accel_core`'s verbs are functions, their configs reject bad
values with a message, and the README's diffusers snippet runs as written."""
import functools
import inspect
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
VERBS = ("compile", "cast", "deepcache", "apply_loras", "lcm_sample")


CHECK_VERBS = """
import importlib, importlib.util, inspect, sys, types
first = sys.argv[1]
if first != "-":
    importlib.import_module("sd_accel.accel_core." + first)  # sets the package attribute of that name...
import sd_accel.accel_core as core
import sd_accel.accel_core.deepcaching  # ...and so does this, after the package is there
from sd_accel.accel_core import deepcache
bad = [v for v in {verbs!r} if not inspect.isfunction(getattr(core, v)) or isinstance(getattr(core, v), types.ModuleType)]
assert callable(deepcache) and not isinstance(deepcache, types.ModuleType), deepcache
assert not bad, bad
# No runtime module shares a verb's name, so no import order can bind one over a verb.
clash = [v for v in {verbs!r} if importlib.util.find_spec("sd_accel.accel_core." + v) is not None]
assert not clash, clash
print("ok")
"""


@pytest.mark.parametrize("first", ["-", "deepcaching", "compiling", "casting", "lcm"])
def test_verbs_are_functions_whatever_was_imported_first(first):
    # A submodule import sets the package attribute of its name: no runtime module may be named
    # like a verb (a fresh interpreter per order: the import order is the thing under test).
    import subprocess

    r = subprocess.run([sys.executable, "-c", CHECK_VERBS.format(verbs=VERBS), first], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_the_package_exports_the_verbs_and_their_configs():
    import sd_accel.accel_core.deepcaching  # noqa: F401  (the module import must not shadow the verb)
    from sd_accel import accel_core
    from sd_accel.accel_core import deepcache

    assert callable(deepcache) and not isinstance(deepcache, types.ModuleType)
    for verb in VERBS:
        assert inspect.isfunction(getattr(accel_core, verb)), verb
    assert set(VERBS) | {"CompileConfig", "CastConfig", "DeepCacheConfig", "LoraConfig", "LoraSpec", "LcmConfig"} <= set(accel_core.__all__)


def test_importing_the_core_does_not_import_the_cli_or_a_host():
    code = ("import sys, sd_accel.accel_core, sd_accel.accel_core.deepcaching, sd_accel.accel_core.lora, sd_accel.accel_core.lcm; "
            "bad = [m for m in sys.modules if m.startswith(('sd_accel.cli', 'sd_accel.nodes', 'sd_accel.accel_core.hosts', 'comfy'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


BAD_CONFIGS = [
    ("CompileConfig", dict(backend="tensorrt"), "backend"),
    ("CompileConfig", dict(mode="fast"), "mode"),
    ("CompileConfig", dict(dynamic="yes"), "dynamic must be True, False or None"),
    ("CompileConfig", dict(fullgraph=1), "fullgraph must be True or False"),
    ("CompileConfig", dict(fallback="no"), "fallback must be True or False"),
    ("CompileConfig", dict(method="for ward"), "entry method"),
    ("CompileConfig", dict(cache_dir=3), "cache_dir must be a folder path"),
    ("CompileConfig", dict(guards="none"), "guards"),
    ("CastConfig", dict(dtype="int8"), "dtype"),
    ("CastConfig", dict(attention="sparse"), "attention"),
    ("CastConfig", dict(channels_last="yes"), "channels_last must be True or False"),
    ("DeepCacheConfig", dict(cache_interval=0), "cache_interval"),
    ("DeepCacheConfig", dict(cache_depth=-1), "cache_depth"),
    ("DeepCacheConfig", dict(start_percent=1.5), r"start_percent must be a number in \[0, 1\]"),
    ("DeepCacheConfig", dict(start_percent="a"), "start_percent"),
    ("DeepCacheConfig", dict(end_percent=None), "end_percent"),
    ("DeepCacheConfig", dict(start_percent=0.8, end_percent=0.2), "below end_percent"),
    ("DeepCacheConfig", dict(schedule="random"), "schedule"),
    ("LoraConfig", dict(backup_device="disk"), "backup device"),
    ("LoraConfig", dict(min_match=0.0), r"min_match must be a number in \(0, 1\]"),
    ("LoraConfig", dict(min_match=2), r"min_match"),
    ("LcmConfig", dict(steps=0), "steps"),
    ("LcmConfig", dict(steps=2.5), "steps"),
    ("LcmConfig", dict(cfg=-1), "cfg must be a number"),
    ("LcmConfig", dict(cfg="high"), "cfg must be a number"),
    ("LcmConfig", dict(denoise=0), "denoise"),
    ("LcmConfig", dict(strength=float("nan")), "strength"),
]


@pytest.mark.parametrize("cls,kw,match", BAD_CONFIGS, ids=[f"{c}-{next(iter(k))}-{i}" for i, (c, k, _) in enumerate(BAD_CONFIGS)])
def test_verb_configs_reject_bad_values_with_a_message(cls, kw, match):
    from sd_accel import accel_core

    with pytest.raises(accel_core.SDAccelError, match=match) as e:
        getattr(accel_core, cls)(**kw)
    text = str(e.value)
    # what was expected (match), what was found (the value), what to do (a sentence after it)
    value = next(iter(kw.values()))
    assert (repr(value) in text or str(value) in text) and len(re.split(r"[.;] ", text)) >= 2, text


def test_lora_spec_rejects_a_strength_that_is_not_a_number():
    from sd_accel.accel_core import LoraSpec, SDAccelError

    with pytest.raises(SDAccelError, match="strength of 'a.safetensors' must be a number"):
        LoraSpec("a.safetensors", "strong")
    assert LoraSpec("a.safetensors", -0.5).strength == -0.5  # negative strengths are a real use


def test_default_configs_are_valid():
    from sd_accel import accel_core

    for cls in ("CompileConfig", "CastConfig", "DeepCacheConfig", "LoraConfig", "LcmConfig"):
        getattr(accel_core, cls)()


# --- the README's diffusers snippet ---------------------------------------------------------------

def readme_python_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Python (diffusers)", 1)
    assert len(section) == 2, "README.md has no '### Python (diffusers)' section"
    m = re.search(r"^```python\n(.*?)^```", section[1], re.S | re.M)
    assert m, "README.md's Python (diffusers) section has no ```python block"
    return m.group(1)


def test_the_readme_diffusers_snippet_runs_as_written(tmp_path, monkeypatch):
    """Exactly the README's block, on a tiny random diffusers UNet with a real diffusers scheduler.

    The names the snippet takes from the reader's own loop (pipe, scheduler, latent_in, ctx)
    are defined here; compile runs with dynamo's eager backend (inductor itself is under test
    in test_compile.py), so this checks the calls, names and arguments the README shows.
    """
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    from sd_accel import accel_core
    from sd_accel.accel_core.deepcaching import DeepCacheUNet
    from testkit.loras import make_random_lora

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                sample_size=8, attention_head_dim=4).eval()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    monkeypatch.chdir(tmp_path)
    code = readme_python_snippet()
    for name in re.findall(r'LoraSpec\("([^"]+)"', code):  # the LoRA files the snippet names
        save_file({k: v.contiguous() for k, v in make_random_lora(unet, "kohya-ldm", seed=1).items()}, name)
    monkeypatch.setattr(accel_core, "CompileConfig", functools.partial(accel_core.CompileConfig, torch_backend="eager"))
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(6)
    ns = {"pipe": types.SimpleNamespace(unet=unet), "scheduler": scheduler,
          "latent_in": torch.randn(2, 4, 8, 8), "ctx": torch.randn(2, 7, 16)}
    with torch.no_grad():
        exec(compile(code, "README.md (Python (diffusers))", "exec"), ns)
    assert ns["eps"].shape == (2, 4, 8, 8) and torch.isfinite(ns["eps"]).all()
    dc = ns["dc"]
    assert isinstance(dc, DeepCacheUNet)
    stats = dc.stats()
    assert stats["hits"] > 0, stats  # with interval 3 over 6 steps, some steps were shallow
    if "apply_loras" in code:
        changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])]
        assert changed, "the snippet's LoRA changed no weight"
        accel_core.apply_loras(unet, [])
        assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_no_core_host_or_node_file_imports_the_cli():
    """cli (the sd-accel command, the bench, serve) imports core, hosts and nodes; none of them imports cli (not even lazily, in a function)."""
    import ast

    offenders = []
    files = [ROOT / "__init__.py", *(ROOT / "accel_core").rglob("*.py"), *(ROOT / "nodes").rglob("*.py")]
    for path in files:
        package = ["sd_accel", *path.relative_to(ROOT).parent.parts]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                names = [".".join(base + ([node.module] if node.module else []) + ([a.name] if not node.module else [])) for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n == "sd_accel.cli" or n.startswith("sd_accel.cli.")]
    assert len(files) > 20 and not offenders, offenders
