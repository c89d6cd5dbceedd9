"""argparse types shared by the `sd-accel` verbs: each message says what was expected, what was found and what to do."""
from __future__ import annotations

import argparse


def count(what: str, todo: str, minimum: int = 1, maximum: int | None = None):
    """argparse type: a whole number >= minimum (<= maximum); the message says what was expected, what was found, what to do."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            span = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
            raise argparse.ArgumentTypeError(f"expects {what} (a whole number {span}), found {text!r}; {todo}")
        return value
    return parse


def scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expects a finite number of 0 or more, found {text!r}; give e.g. --cfg-scale 7")
    return value


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it."""

    def _get_help_string(self, action):
        if "default:" in (action.help or "") or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
