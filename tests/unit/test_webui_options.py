"""The webui extension's pure logic: options from the accordion, infotext written and read back, XYZ overrides."""
import pytest

from sd_accel.accel_core.backends import BACKENDS
from sd_accel.accel_core.errors import SDAccelError
from sd_accel.accel_core.hosts import webui as w


def test_defaults_are_off_and_write_nothing():
    opts = w.WebuiOptions()
    assert not opts.active
    assert w.to_infotext(opts) == {}
    # Settings that are "on" but with the master switch off still write nothing.
    assert w.to_infotext(w.WebuiOptions(backend="inductor", deepcache_interval=3)) == {}


def test_args_follow_ui_field_order_and_types():
    args = [True, "inductor", "reduce-overhead", "bf16", True, "math", 3.0, 2.0, 0.1, 0.9, "lcm-lora-sdv1-5", 0.8, "style:0.5, detail",
            "forecast", 2.0, 1.0, 0.2]
    assert len(args) == len(w.UI_FIELDS)
    opts = w.options_from_args(args)
    assert opts.backend == "inductor" and opts.mode == "reduce-overhead" and opts.dtype == "bf16"
    assert opts.deepcache_interval == 3 and isinstance(opts.deepcache_interval, int)  # gradio sliders send floats
    assert opts.loras == (("style", 0.5), ("detail", 1.0))
    assert opts.compile_on and opts.cast_on and opts.deepcache_on and opts.lcm_on and opts.loras_on
    assert (opts.stepcache_mode, opts.stepcache_front, opts.stepcache_back, opts.stepcache_threshold) == ("forecast", 2, 1, 0.2)
    assert isinstance(opts.stepcache_front, int)
    # A caller from before the Step Cache's controls (its 13 positional args, e.g. an API script) still fits: they keep their defaults.
    old = w.options_from_args(args[:13])
    assert old == w.WebuiOptions(**{**{n: getattr(opts, n) for n in w.UI_FIELDS[:13]}})
    assert old.stepcache_mode == w.UI_OPTIONS["stepcache_mode"].default


@pytest.mark.parametrize("opts", [
    w.WebuiOptions(enabled=True, backend="inductor"),
    w.WebuiOptions(enabled=True, backend="auto", mode="max-autotune-no-cudagraphs", dtype="fp16", channels_last=True, attention="flash"),
    w.WebuiOptions(enabled=True, attention="efficient"),
    w.WebuiOptions(enabled=True, deepcache_interval=3, deepcache_depth=2, deepcache_start=0.15, deepcache_end=0.85),
    w.WebuiOptions(enabled=True, lcm_lora="LCM_LoRA_Weights_SD15", lcm_strength=0.75),
    w.WebuiOptions(enabled=True, loras=(("a b:c", 0.3), ("x", -1.25))),
    w.WebuiOptions(enabled=True, backend="stable-fast", mode="reduce-overhead", dtype="bf16", deepcache_interval=5, deepcache_depth=0,
                   lcm_lora="lcm", lcm_strength=1.0, loras=(("one", 1.0),)),
])
def test_infotext_round_trip(opts):
    text = w.to_infotext(opts)
    assert text and all(k.startswith("SD Accel") for k in text)
    back = w.from_infotext(dict(text))
    # Every feature that is on comes back exactly; features that are off come back off.
    assert w.to_infotext(back) == text
    assert back.compile_on == opts.compile_on and back.deepcache_on == opts.deepcache_on and back.loras == (opts.loras if opts.loras_on else ())
    if opts.compile_on:
        assert (back.backend, back.mode) == (opts.backend, opts.mode)
    if opts.deepcache_on:
        assert (back.deepcache_interval, back.deepcache_depth, back.deepcache_start, back.deepcache_end) == \
            (opts.deepcache_interval, opts.deepcache_depth, opts.deepcache_start, opts.deepcache_end)


@pytest.mark.parametrize("opts", [
    w.WebuiOptions(enabled=True, deepcache_interval=3),
    w.WebuiOptions(enabled=True, backend="inductor", deepcache_interval=4, deepcache_start=0.2, deepcache_end=0.9, stepcache_mode="forecast",
                   stepcache_front=2, stepcache_back=1),
    w.WebuiOptions(enabled=True, deepcache_interval=5, stepcache_mode="adaptive", stepcache_threshold=0.25, loras=(("x", 0.5),)),
])
def test_step_cache_infotext_round_trip_on_a_dit(opts):
    """On a DiT model the cache controls ran the Step Cache: its own entry, read back into the same controls."""
    text = w.to_infotext(opts, dit=True)
    assert w.K_DEEPCACHE not in text and text[w.K_STEPCACHE].startswith(f"mode={opts.stepcache_mode} interval={opts.deepcache_interval} ")
    assert ("threshold=" in text[w.K_STEPCACHE]) == (opts.stepcache_mode == "adaptive")
    back = w.from_infotext(dict(text))
    assert w.to_infotext(back, dit=True) == text
    assert back == opts  # DeepCache's depth (not a DiT's) is at its default in these


def test_a_unets_infotext_is_deepcaches_as_before():
    opts = w.WebuiOptions(enabled=True, deepcache_interval=3, stepcache_mode="forecast", stepcache_front=4)
    assert w.to_infotext(opts) == {w.K_DEEPCACHE: "interval=3 depth=0 start=0 end=1"}
    old = w.from_infotext({w.K_DEEPCACHE: "interval=3 depth=2 start=0.1 end=0.9"})  # an image from before the Step Cache
    assert (old.deepcache_interval, old.deepcache_depth, old.stepcache_mode) == (3, 2, w.WebuiOptions().stepcache_mode)
    with pytest.raises(SDAccelError, match="sometimes"):
        w.from_infotext({w.K_STEPCACHE: "mode=sometimes interval=3"})
    with pytest.raises(SDAccelError, match="could not read"):
        w.from_infotext({w.K_STEPCACHE: "mode=fixed front=2"})


def test_infotext_survives_the_webui_text_format():
    """What the webui does to the values: `key: value` pairs joined by ", ", values with commas quoted."""
    import json

    opts = w.WebuiOptions(enabled=True, backend="inductor", loras=(("a", 0.5), ("b", 1.0)), deepcache_interval=3)
    text = ", ".join(f"{k}: {json.dumps(v) if ',' in v else v}" for k, v in w.to_infotext(opts).items())
    assert w.K_LORA + ': "a:0.5, b:1"' in text
    # The webui unquotes quoted values when it parses; the dict it hands to paste functions:
    parsed = {}
    for part in [p for p in _split_top_level(text)]:
        k, v = part.split(": ", 1)
        parsed[k] = json.loads(v) if v.startswith('"') else v
    assert w.from_infotext(parsed) == opts


def _split_top_level(text):
    out, cur, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def test_paste_functions_set_each_component():
    opts = w.WebuiOptions(enabled=True, backend="inductor", dtype="bf16", channels_last=True, deepcache_interval=4, loras=(("s", 0.5),))
    params = {"Steps": "20", **w.to_infotext(opts)}
    values = {name: w.infotext_field(name)(params) for name in w.UI_FIELDS}
    assert values["enabled"] is True and values["backend"] == "inductor" and values["deepcache_interval"] == 4
    assert values["loras"] == "s:0.5"
    # An image without SD Accel entries switches the accordion off (reproducible paste).
    assert w.infotext_field("enabled")({"Steps": "20"}) is False
    # Same function object per field, so "Send to img2img" pairs the two tabs' components.
    assert w.infotext_field("backend") is w.infotext_field("backend")


def test_bad_infotext_leaves_components_alone():
    assert w.infotext_field("backend")({w.K_COMPILE: "tensorrt default"}) is None
    with pytest.raises(SDAccelError, match="unknown backend 'tensorrt'"):
        w.from_infotext({w.K_COMPILE: "tensorrt default"})
    with pytest.raises(SDAccelError, match="could not read"):
        w.from_infotext({w.K_DEEPCACHE: "depth=2"})


def test_status_key_is_not_a_setting():
    assert w.K_STATUS not in w.SETTING_KEYS
    assert w.from_infotext({w.K_STATUS: "compile partial: 3 block(s) eager"}) == w.WebuiOptions()


@pytest.mark.parametrize("field, value, match", [
    ("backend", "tensorrt", "unknown backend"), ("dtype", "int8", "unknown dtype"), ("deepcache_interval", 0, "interval"),
    ("deepcache_start", 1.0, "start/end"), ("attention", "xformers", "unknown attention"),
])
def test_bad_options_say_what_was_expected(field, value, match):
    with pytest.raises(SDAccelError, match=match):
        w.WebuiOptions(**{field: value})


def test_lora_list_parsing():
    assert w.parse_loras("") == ()
    assert w.parse_loras("a:0.5; b\nc:2") == (("a", 0.5), ("b", 1.0), ("c", 2.0))
    assert w.parse_loras("sdxl:style") == (("sdxl:style", 1.0),)  # colon in the name, no weight
    assert w.format_loras(w.parse_loras("a:0.5, b")) == "a:0.5, b:1"
    with pytest.raises(SDAccelError, match="no name"):
        w.parse_loras(":0.5")


def test_xyz_overrides_enable_and_validate():
    base = w.WebuiOptions(backend="inductor")
    got = w.with_overrides(base, {"deepcache_interval": 3})
    assert got.enabled and got.deepcache_interval == 3 and got.backend == "inductor"
    assert w.with_overrides(base, None) is base
    assert w.with_overrides(base, {"loras": "a:0.5"}).loras == (("a", 0.5),)
    with pytest.raises(SDAccelError, match="unknown option"):
        w.with_overrides(base, {"speed": 11})
    with pytest.raises(SDAccelError, match="unknown backend"):
        w.with_overrides(base, {"backend": "nope"})


def test_compile_config_follows_options(monkeypatch):
    assert w.WebuiOptions(enabled=True).compile_config() is None
    monkeypatch.setenv("SD_ACCEL_DYNAMO_BACKEND", "eager")
    cfg = w.WebuiOptions(enabled=True, backend="inductor", mode="reduce-overhead").compile_config()
    assert (cfg.backend, cfg.mode, cfg.torch_backend) == ("inductor", "reduce-overhead", "eager")
    assert w.WebuiOptions(enabled=True, dtype="off", channels_last=True).cast_config().dtype == "auto"
    dc = w.WebuiOptions(enabled=True, deepcache_interval=3, deepcache_depth=2, deepcache_start=0.1, deepcache_end=0.9).deepcache_config()
    assert (dc.cache_interval, dc.cache_depth, dc.start_percent, dc.end_percent) == (3, 2, 0.1, 0.9)


def test_lora_files_and_specs(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "style.safetensors").write_bytes(b"x")
    (tmp_path / "sub" / "lcm.safetensors").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    files = w.lora_files(str(tmp_path))
    assert set(files) == {"style", "lcm"}
    specs = w.lora_specs(w.WebuiOptions(enabled=True, loras=(("style", 0.5),), lcm_lora="lcm", lcm_strength=0.8), str(tmp_path))
    assert [(s.path, s.strength) for s in specs] == [(files["style"], 0.5), (files["lcm"], 0.8)]
    with pytest.raises(SDAccelError, match="'missing' is not in the webui's LoRA folder.*style"):
        w.lora_specs(w.WebuiOptions(enabled=True, loras=(("missing", 1.0),)), str(tmp_path))
    assert w.lora_files(str(tmp_path / "absent")) == {}


def test_loras_under_every_lora_folder(tmp_path):
    # Forge Neo: --lora-dir plus --lora-dirs (a list); the first folder wins a name found in both.
    first, second, third = tmp_path / "Lora", tmp_path / "comfy_loras", tmp_path / "more"
    for d in (first, second, third):
        d.mkdir()
    (first / "style.safetensors").write_bytes(b"x")
    (second / "style.safetensors").write_bytes(b"x")
    (second / "detail.safetensors").write_bytes(b"x")
    (third / "lcm.safetensors").write_bytes(b"x")
    dirs = [str(first), str(second), str(third)]
    files = w.lora_files(dirs)
    assert files == {"style": str(first / "style.safetensors"), "detail": str(second / "detail.safetensors"), "lcm": str(third / "lcm.safetensors")}
    specs = w.lora_specs(w.WebuiOptions(enabled=True, loras=(("detail", 0.5),), lcm_lora="lcm"), dirs)
    assert [s.path for s in specs] == [files["detail"], files["lcm"]]
    with pytest.raises(SDAccelError) as e:
        w.lora_specs(w.WebuiOptions(enabled=True, loras=(("missing", 1.0),)), dirs)
    assert all(d in str(e.value) for d in dirs) and "detail" in str(e.value)
    assert w.lora_files([str(tmp_path / "absent"), None]) == {}


def test_backend_table_lists_every_backend():
    rows = w.backend_table()
    assert [r[0] for r in rows] == list(BACKENDS)
    inductor = next(r for r in rows if r[0] == "inductor")
    assert inductor[2] == "yes"  # inductor runs on the CPU everywhere


def test_feature_status_names_what_is_missing():
    status = w.feature_status()
    assert set(status) == {"deepcache", "lora", "lcm"}
    assert status == {"deepcache": None, "lora": None, "lcm": None}  # this copy has them all (accel_core.deepcache is a verb, not the module)
    for name, why in status.items():
        assert why is None or name.lower()[:4] in why.lower()
