"""Forward SD Accel status events to the ComfyUI browser tab (web/sdaccel.js draws them).

The core emits events (`accel_core.events`) from deep inside sampling, where it does not
know which graph node it belongs to; our nodes record that on their clones (`track`, in
comfy/tracking.py). The listener adds the run's node mapping and ComfyUI's executing node to
every event and sends it as `sdaccel.<event>`.

Nothing here needs a browser: without a PromptServer (tests, scripts) the listener does
nothing, and a failing send never reaches sampling (events.emit swallows it).
"""
from __future__ import annotations

import math
import sys
import time

from ... import events
from ...log import logger
# The node side (re-exported: nodes and tests use comfy.events); payload reads the run's mapping.
from .tracking import KINDS, LAST_RUN, NODES_KEY, STATS_KEY, LastRun, _executing, _run_nodes, track, tracked_nodes  # noqa: F401

PREFIX = "sdaccel."


def _jsonable(value):
    # send_sync serialises on the event loop thread, where an error would be lost, and the
    # browser's JSON.parse rejects NaN/Infinity: make the payload plain JSON here.
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def payload(event: str, data: dict) -> dict:
    """What the browser receives for `event` (also used by tests)."""
    node, prompt_id = _executing()
    nodes = _run_nodes.get()
    if nodes is None:
        nodes = LAST_RUN.nodes_of(node)
    return _jsonable({**data, "event": event, "nodes": nodes,
                      "executing": node, "prompt_id": prompt_id, "time": time.time()})


def _server():
    # Only a running ComfyUI has imported `server` and created the instance; never import it here.
    mod = sys.modules.get("server")
    ps = getattr(mod, "PromptServer", None)
    return getattr(ps, "instance", None)


def forward(event: str, data: dict) -> None:
    """events listener: send `event` to the browser as `sdaccel.<event>`."""
    server = _server()
    if server is None:
        return
    server.send_sync(PREFIX + event, payload(event, data), getattr(server, "client_id", None))


def install() -> None:
    """Subscribe the forwarder (idempotent). Called by the pack's __init__ inside ComfyUI."""
    events.subscribe(forward)
    logger.debug("SD Accel: forwarding status events to the ComfyUI frontend")


__all__ = ["PREFIX", "KINDS", "LastRun", "LAST_RUN", "track", "tracked_nodes", "payload", "forward", "install"]
