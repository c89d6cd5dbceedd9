"""The optional backends' probes name what is missing (docs/backends.md)."""
from sd_accel.accel_core import optional
from sd_accel.accel_core.backends import BACKENDS


def _only(monkeypatch, present):
    monkeypatch.setattr(optional, "is_available", lambda name: name in present)


def test_onediff_without_oneflow_or_nexfort_names_oneflow(monkeypatch):
    _only(monkeypatch, {"onediff"})
    b = BACKENDS["onediff"]
    assert not b.available("cuda") and b.missing("cuda") == "oneflow"
    assert "Python 3.11+" in optional.INSTALL_HINTS["oneflow"]


def test_stable_fast_missing_names_sfast(monkeypatch):
    _only(monkeypatch, set())
    b = BACKENDS["stable-fast"]
    assert not b.available("cuda") and b.missing("cuda") == "sfast"


def test_stable_fast_missing_names_why_it_cannot_be_had_on_new_torch(monkeypatch):
    _only(monkeypatch, set())
    hint = optional.INSTALL_HINTS[BACKENDS["stable-fast"].missing("cuda")]
    assert "torch 2.11+" in hint and "CuBLASReductionOption" in hint and "inductor" in hint


def test_stable_fast_installed_without_a_loadable_extension_is_not_available(monkeypatch):
    # sfast imports, sfast._C (built for another torch) does not: auto must not pick it.
    _only(monkeypatch, {"sfast"})
    monkeypatch.setattr(optional, "load_error", lambda name: "ImportError: undefined symbol" if name == "sfast._C" else "")
    b = BACKENDS["stable-fast"]
    assert not b.available("cuda") and b.missing("cuda") == "sfast._C"
    assert "C extension" in optional.INSTALL_HINTS["sfast._C"]
    from sd_accel.accel_core.backends import resolve
    assert resolve("auto", "cuda").name == "inductor"


def test_load_error_says_why_a_module_does_not_import():
    assert optional.load_error("json") == ""
    assert optional.load_error("sd_accel_no_such_module").startswith("ModuleNotFoundError")


def test_backends_verb_prints_the_hint(capsys, monkeypatch):
    _only(monkeypatch, set())
    from sd_accel.cli.main import main
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "missing: sfast (stable-fast 1.0.5" in out
