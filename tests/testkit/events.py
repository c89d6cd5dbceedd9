"""Collect the pack's events of one name while a test runs."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def collected(events, name: str):
    """The data of every `name` event that `events` (the pack's accel_core.events module, as the host loaded it) emits inside the block."""
    seen = []

    def listen(event, data):
        if event == name:
            seen.append(data)

    events.subscribe(listen)
    try:
        yield seen
    finally:
        events.unsubscribe(listen)
