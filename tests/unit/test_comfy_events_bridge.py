"""The ComfyUI event forwarder, without a host: a fake PromptServer stands in for server.py."""
import logging
import math
import sys
import types

import pytest

from sd_accel.accel_core import events
from sd_accel.accel_core.hosts.comfy import events as comfy_events


class FakeServer:
    def __init__(self, client_id="tab-1"):
        self.client_id = client_id
        self.sent = []

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))


@pytest.fixture
def server(monkeypatch):
    srv = FakeServer()
    mod = types.ModuleType("server")
    mod.PromptServer = type("PromptServer", (), {"instance": srv})
    monkeypatch.setitem(sys.modules, "server", mod)
    comfy_events.install()
    yield srv
    events.unsubscribe(comfy_events.forward)


def test_without_a_server_forwarding_is_a_no_op(monkeypatch):
    monkeypatch.delitem(sys.modules, "server", raising=False)
    comfy_events.forward("compile_start", {"backend": "inductor"})  # must not raise


def test_events_reach_the_browser_prefixed_with_node_mapping(server):
    token = comfy_events._run_nodes.set({"compile": "7", "cast": "3"})
    try:
        events.emit("compile_start", backend="inductor", mode="default", target="UNetModel")
    finally:
        comfy_events._run_nodes.reset(token)
    (event, data, sid), = server.sent
    assert event == "sdaccel.compile_start" and sid == "tab-1"
    assert data["nodes"] == {"compile": "7", "cast": "3"}
    assert data["backend"] == "inductor" and data["event"] == "compile_start"


def test_payload_is_plain_json(server):
    events.emit("run_stats", its=float("nan"), seconds=math.inf, report={"fallbacks": {"input_blocks.1": "Unsupported"}},
                shape=(1, 4, 8, 8), obj=object())
    data = server.sent[-1][1]
    assert data["its"] is None and data["seconds"] is None  # JSON.parse rejects NaN / Infinity
    assert data["shape"] == [1, 4, 8, 8] and isinstance(data["obj"], str)
    assert data["nodes"] == {} and data["executing"] is None


def test_install_is_idempotent(server):
    comfy_events.install()
    events.emit("fallback", report={})
    assert len(server.sent) == 1


def test_a_broken_server_never_reaches_the_caller(server, caplog):
    calls = []

    def boom(event, *a, **k):
        calls.append(event)
        raise RuntimeError("socket closed")

    server.send_sync = boom
    with pytest.raises(RuntimeError, match="socket closed"):
        comfy_events.forward("compile_end", {"report": {}})  # the forwarder itself does fail
    calls.clear()
    with caplog.at_level(logging.DEBUG, logger="sd_accel"):
        events.emit("compile_end", report={})  # must not raise: the bus contains it
    assert calls == ["sdaccel.compile_end"]  # the forwarder was subscribed and ran
    assert "socket closed" in caplog.text and "compile_end" in caplog.text  # and the failure is logged, not lost


def test_track_leaves_a_passed_through_model_alone():
    model = types.SimpleNamespace(model_options={})
    assert comfy_events.track(model, "compile", "5", source=model) is model
    assert model.model_options == {}
    assert comfy_events.track(object(), "compile", None) is not None


def test_summaries_after_the_loop_keep_the_runs_nodes(server, monkeypatch):
    # DeepCache's summary is emitted by an outer wrapper, after our run scope closed, while
    # ComfyUI still executes the same sampler node.
    monkeypatch.setattr(comfy_events, "_executing", lambda: ("9", "p1"))
    monkeypatch.setattr(comfy_events, "LAST_RUN", comfy_events.LastRun())
    comfy_events.LAST_RUN.record("9", {"deepcache": "6", "compile": "5"})
    events.emit("deepcache_stats", hits=2, full=2, ratio=0.5)
    data = server.sent[-1][1]
    assert data["nodes"] == {"deepcache": "6", "compile": "5"} and data["executing"] == "9" and data["ratio"] == 0.5
