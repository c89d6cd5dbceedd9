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
