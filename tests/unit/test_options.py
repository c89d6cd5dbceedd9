"""Every surface shows the options exactly as their declarations on the core's configs say.

The surfaces are found, not listed: the config classes by walking accel_core for declared
fields, the ComfyUI nodes from nodes/, the webui accordion and Settings page by running the
extension's script against recording stand-ins for gradio and the webui, the CLI from its parser.
"""
import dataclasses
import importlib
import pkgutil
import sys
import types
from pathlib import Path

import pytest

import sd_accel.accel_core as core
from sd_accel.accel_core.errors import SDAccelError
from sd_accel.accel_core.hosts import webui as w
from sd_accel.accel_core.options import HOSTS, KEY, comfy_input, declared

REPO = Path(__file__).resolve().parents[2]


def _configs():
    """Every dataclass in accel_core's top-level modules with declared options."""
    found = {}
    for info in pkgutil.iter_modules(core.__path__):
        mod = importlib.import_module(f"{core.__name__}.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == mod.__name__ and declared(obj):
                found[obj.__qualname__] = obj
    return found


CONFIGS = _configs()


def test_the_features_declare_their_options():
    assert {"CompileConfig", "CastConfig", "DeepCacheConfig", "LcmConfig", "LoraSpec"} <= set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_declared_defaults_are_valid_and_ranges_are_enforced(name):
    cls = CONFIGS[name]
    need = {f.name: "x.safetensors" for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
    for host in HOSTS:
        for opt in declared(cls, host).values():
            if opt.kind == "COMBO":
                assert opt.default in opt.choices, (name, host, opt.name)
            if opt.kind in ("INT", "FLOAT"):
                assert opt.min <= opt.default <= opt.max and opt.step, (name, host, opt.name)
    for opt in declared(cls).values():
        cls(**need)  # the declared defaults make a valid config
        bad = "no-such-choice" if opt.kind == "COMBO" else ((opt.min - 1) if opt.per_model else (opt.max + 1)) if opt.kind in ("INT", "FLOAT") else None
        if bad is not None:
            with pytest.raises(SDAccelError):
                cls(**need, **{opt.name: bad})


# --- ComfyUI ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nodes():
    """Every node class in nodes/ (a stand-in `folder_paths` when no ComfyUI is on the path)."""
    stub = None
    if importlib.util.find_spec("folder_paths") is None:
        stub = sys.modules["folder_paths"] = types.SimpleNamespace(get_filename_list=lambda kind: ["a.safetensors"])
    try:
        classes = {}
        for path in sorted((REPO / "nodes").glob("*.py")):
            if path.stem != "__init__":
                classes.update(importlib.import_module(f"sd_accel.nodes.{path.stem}").NODE_CLASS_MAPPINGS)
        return classes
    finally:
        if stub is not None:
            del sys.modules["folder_paths"]


def test_every_node_widget_is_a_declared_option_and_every_option_is_on_a_node(nodes):
    declared_inputs = {(cfg, name): comfy_input(cls, name) for cfg, cls in CONFIGS.items() for name in declared(cls)}
    shown, own = set(), []
    for node, cls in nodes.items():
        for section in ("required", "optional"):
            for name, spec in cls.INPUT_TYPES().get(section, {}).items():
                if not isinstance(spec[0], list) and spec[0] not in ("INT", "FLOAT", "BOOLEAN", "STRING"):
                    continue  # MODEL, CONDITIONING, LATENT: sockets, not options
                matches = [key for key, want in declared_inputs.items() if want == tuple(spec)]
                if matches:
                    shown.update(matches)
                else:
                    own.append(f"{node}.{name}")
    # What a node shows that no config declares: the files it reads and the seed (not options of a feature).
    assert sorted(own) == ["SDAccelLCMLoRASampler.lcm_lora_name", "SDAccelLCMLoRASampler.seed", "SDAccelLoRAHotSwap.lora_name"], \
        "a node input differs from every declaration (copied by hand?)"
    assert set(declared_inputs) <= shown, f"declared options on no node: {sorted(set(declared_inputs) - shown)}"


# --- webui -------------------------------------------------------------------------------------------

def test_every_accordion_field_is_a_declared_option():
    for f in dataclasses.fields(w.WebuiOptions):
        opt = f.metadata.get(KEY)
        assert opt is not None, f"WebuiOptions.{f.name} has no declaration"
        assert f.default == opt.default or f.default_factory() == opt.default
        core_ref = f.metadata.get("sd_accel.core")
        if core_ref is not None:
            cfg, name = core_ref
            assert dataclasses.replace(opt, name=name) == declared(cfg, "webui")[name], f.name
    assert w.UI_FIELDS == tuple(w.UI_OPTIONS)


def _values(opt):
    if opt.kind == "COMBO":
        return list(opt.choices)
    if opt.kind in ("INT", "FLOAT"):
        return [opt.min, opt.max, opt.default]
    return [True, False] if opt.kind == "BOOLEAN" else []


@pytest.mark.parametrize("name", [n for n in w.UI_FIELDS if w.UI_OPTIONS[n].kind != "STRING"])
def test_infotext_carries_every_declared_value(name):
    """Each value the accordion can send, with its feature on, comes back from the infotext (min, max, every choice)."""
    on = dict(enabled=True, backend="inductor", dtype="fp16", attention="math", deepcache_interval=3, deepcache_start=0.0, deepcache_end=1.0,
              lcm_lora="lcm", loras=(("a", 1.0),))
    for value in _values(w.UI_OPTIONS[name]):
        kw = {**on, name: value}
        if name == "deepcache_interval" and value == 1:
            continue  # 1 is off: nothing to record
        if name in ("deepcache_start", "deepcache_end") and not kw["deepcache_start"] < kw["deepcache_end"]:
            kw["deepcache_start" if name == "deepcache_end" else "deepcache_end"] = 0.5 if value in (0.0, 1.0) else value
            kw["deepcache_start"], kw["deepcache_end"] = sorted((kw["deepcache_start"], kw["deepcache_end"]))
        if name in ("backend", "dtype") and value == w.OFF:
            continue
        if name == "stepcache_threshold":
            kw["stepcache_mode"] = "adaptive"  # the mode that reads it (the entry leaves it out otherwise)
        opts = w.WebuiOptions(**kw)
        # On a UNet the cache controls are DeepCache's; on a DiT model (dit) the Step Cache's, recorded under its own key.
        for dit in (False, True):
            if (name.startswith("stepcache_") and not dit) or (name == "deepcache_depth" and dit):
                continue  # what the other cache reads
            back = w.from_infotext(w.to_infotext(opts, dit=dit))
            assert getattr(back, name) == getattr(opts, name), (name, value, dit)


def test_infotext_leaves_out_what_the_declaration_defaults():
    back = w.from_infotext({w.K_DEEPCACHE: "interval=3"})
    assert back.deepcache_depth == w.UI_OPTIONS["deepcache_depth"].default
    assert back.deepcache_end == w.UI_OPTIONS["deepcache_end"].default


class _Recorder:
    """Stand-ins for gradio components and webui classes: each records its arguments."""

    made: list = []

    def __init__(self, *args, **kw):
        self.args, self.kw = args, kw
        _Recorder.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def info(self, text):
        self.kw["info"] = text
        return self


@pytest.fixture
def script(monkeypatch):
    """scripts/sd_accel_script.py, imported against recording stand-ins for gradio and the webui's modules."""
    kinds = {k: type(k, (_Recorder,), {}) for k in ("Dropdown", "Slider", "Checkbox", "Textbox", "Row", "Markdown", "InputAccordion", "OptionInfo")}
    gr = types.SimpleNamespace(**kinds)
    settings = {}
    shared = types.SimpleNamespace(opts=types.SimpleNamespace(data={}, add_option=lambda key, info: settings.__setitem__(key, info)),
                                   cmd_opts=types.SimpleNamespace(), models_path=str(REPO / "absent"))

    class Script:
        def elem_id(self, name):
            return name

    modules = types.SimpleNamespace(
        script_callbacks=types.SimpleNamespace(on_ui_settings=lambda f: None, on_before_ui=lambda f: None, on_model_loaded=lambda f: None,
                                               on_script_unloaded=lambda f: None),
        scripts=types.SimpleNamespace(Script=Script, AlwaysVisible=object()), shared=shared,
        ui_components=types.SimpleNamespace(InputAccordion=kinds["InputAccordion"]), options=types.SimpleNamespace(OptionInfo=kinds["OptionInfo"]))
    for name, mod in {"gradio": gr, "modules": modules, **{f"modules.{k}": v for k, v in vars(modules).items()}}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    saved = {k: v for k, v in sys.modules.items() if k == "sd_accel" or k.startswith("sd_accel.")}
    spec = importlib.util.spec_from_file_location("sd_accel_script_under_test", REPO / "scripts" / "sd_accel_script.py")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)  # it imports this folder as `sd_accel` afresh
    finally:
        for k in [k for k in sys.modules if k == "sd_accel" or k.startswith("sd_accel.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    _Recorder.made = []
    return mod, settings


def _shown(widget):
    kind = type(widget).__name__
    if kind == "Slider":
        return "SLIDER", widget.kw["value"], widget.kw["label"], (widget.args[0], widget.args[1], widget.kw["step"])
    if kind == "Dropdown":
        return "COMBO", widget.kw["value"], widget.kw["label"], tuple(widget.args[0])
    return kind, widget.kw.get("value"), widget.kw.get("label"), None


def _want(opt):
    kind = {"INT": "SLIDER", "FLOAT": "SLIDER", "BOOLEAN": "Checkbox"}.get(opt.kind, opt.kind)
    return kind, opt.default, opt.label, (opt.min, opt.max, opt.step) if kind == "SLIDER" else opt.choices


def test_the_accordion_shows_the_declarations(script):
    mod, _ = script
    components = mod.SDAccelScript().ui(False)
    assert len(components) == len(w.UI_FIELDS)
    for name, widget in zip(w.UI_FIELDS, components):
        opt = w.UI_OPTIONS[name]
        if name == "enabled":  # the accordion itself is the switch
            assert (widget.args[0], widget.kw["label"]) == (opt.default, "SD Accel")
        elif opt.kind == "STRING":  # the LoRA names (a dropdown of files) and the LoRA list (text)
            assert widget.kw["label"] == opt.label
        else:
            assert _shown(widget) == _want(opt), name


def test_the_settings_page_shows_the_declarations(script):
    mod, settings = script
    mod.on_ui_settings()
    assert sorted(settings) == sorted(f"sd_accel_{n}" for n in w.SETTINGS_FIELDS)
    for name in w.SETTINGS_FIELDS:
        opt, info = w.UI_OPTIONS[name], settings[f"sd_accel_{name}"]
        default, label, component = info.args[:3]
        assert (default, label, info.kw["info"]) == (opt.default, f"Default: {opt.label}", opt.help), name
        if opt.kind == "COMBO":
            assert info.args[3] == {"choices": list(opt.choices)}
        elif opt.kind in ("INT", "FLOAT"):
            assert info.args[3] == {"minimum": opt.min, "maximum": opt.max, "step": opt.step}


def test_the_xyz_axes_show_the_declarations(script):
    """Each XYZ plot axis is named after an option's declared label and sets that option (COMBO axes offer its choices)."""
    mod, _ = script

    class AxisOption:
        def __init__(self, label, typ, apply, choices=None):
            self.label, self.type, self.apply, self.choices = label, typ, apply, choices

    xyz = types.SimpleNamespace(AxisOption=AxisOption, axis_options=[])
    mod.scripts.scripts_data = [types.SimpleNamespace(script_class=type("Script", (), {"__module__": "xyz_grid.py"}), module=xyz)]
    mod._add_xyz_axes()
    axes = {a.label: a for a in xyz.axis_options}
    shown = set()
    for name, opt in w.UI_OPTIONS.items():
        axis = axes.get(f"[SD Accel] {opt.label.split(' (')[0]}")
        if axis is None:
            continue
        p = types.SimpleNamespace()
        value = opt.choices[-1] if opt.kind == "COMBO" else opt.max if opt.kind in ("INT", "FLOAT") else "a:0.5"
        axis.apply(p, str(value), None)
        assert p.sd_accel_overrides == {name: axis.type(str(value))}, name
        w.with_overrides(w.WebuiOptions(), p.sd_accel_overrides)  # a value the declaration accepts
        if opt.kind == "COMBO":
            assert axis.choices() == list(opt.choices), name
        shown.add(name)
    assert len(shown) == len(axes), "an axis that is no declared option's"
    assert {"deepcache_interval", "stepcache_mode", "stepcache_front", "stepcache_threshold"} <= shown


# --- CLI ------------------------------------------------------------------------------------------------

def test_cli_arguments_follow_the_declarations():
    from sd_accel.cli.main import build_parser

    checked = 0
    for sub in build_parser()._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            if not hasattr(action, "sd_accel_option"):
                continue
            cls, name = action.sd_accel_option
            opt = declared(cls, "cli")[name]
            assert (action.default, action.help) == (opt.default, opt.help), name
            if opt.kind == "COMBO":
                assert tuple(action.choices) == opt.choices, name
            checked += 1
    assert checked, "the CLI exposes no declared option any more; update this test"
