"""Status events (compile started/finished, fallbacks, run stats) for whoever listens.

The core only emits; hosts subscribe (ComfyUI forwards them to the browser, the webui tab
shows them). Nothing breaks when no one listens, and a failing listener never reaches the
code that emitted (it is logged at debug level).
"""
from __future__ import annotations

import threading
from typing import Callable

from .log import logger

Listener = Callable[[str, dict], None]


class EventBus:
    """The listeners of one process's SD Accel events. The one instance is BUS."""

    def __init__(self):
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def subscribe(self, fn: Listener) -> None:
        with self._lock:
            if fn not in self._listeners:
                self._listeners.append(fn)

    def unsubscribe(self, fn: Listener) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def listeners(self) -> list[Listener]:
        with self._lock:
            return list(self._listeners)

    def emit(self, event: str, **data) -> None:
        for fn in self.listeners():
            try:
                fn(event, data)
            except Exception as e:  # a broken listener (closed socket, ...) must never fail sampling
                logger.debug("SD Accel: event listener %s failed on %s: %s", getattr(fn, "__name__", fn), event, e)


BUS = EventBus()
subscribe, unsubscribe, emit = BUS.subscribe, BUS.unsubscribe, BUS.emit

__all__ = ["EventBus", "BUS", "Listener", "subscribe", "unsubscribe", "emit"]
