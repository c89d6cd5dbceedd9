"""Status events (compile started/finished, fallbacks, run stats) for whoever listens.

The core only emits; hosts subscribe (ComfyUI forwards them to the browser, the webui tab
shows them). Nothing breaks when no one listens.
"""
from __future__ import annotations

from typing import Callable

from .log import logger

_listeners: list[Callable[[str, dict], None]] = []


def subscribe(fn: Callable[[str, dict], None]) -> None:
    if fn not in _listeners:
        _listeners.append(fn)


def unsubscribe(fn) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def emit(event: str, **data) -> None:
    for fn in list(_listeners):
        try:
            fn(event, data)
        except Exception as e:  # a broken listener (closed socket, ...) must never fail sampling
            logger.debug("SD Accel: event listener failed on %s: %s", event, e)
