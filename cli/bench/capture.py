"""Library warnings during a benchmark run: held back and summarised once, not printed into the progress bar.

Python warnings (`warnings.warn`) and WARNING log records of other libraries (torch, diffusers,
...) are counted per distinct message. SD Accel's own warnings pass through; its per-run info
lines (a DeepCache schedule after every sampling run) are dropped, since the table's note column
says the same once per row.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections import Counter

OURS = "sd_accel"


class Caught:
    def __init__(self):
        self.counts: Counter[str] = Counter()

    def add(self, source: str, message: str):
        first = (message.strip().splitlines() or [""])[0]
        self.counts[f"{source}: {first[:200]}"] += 1

    def summary(self) -> list[dict]:
        return [{"message": m, "count": n} for m, n in self.counts.most_common()]

    @staticmethod
    def lines_of(summary: list[dict], limit: int = 8) -> list[str]:
        """The summary as printed after the progress bar."""
        if not summary:
            return []
        total = sum(w["count"] for w in summary)
        out = [f"{total} library warning(s) during the run, {len(summary)} distinct (all in bench.json under 'warnings'):"]
        out += [f"  {w['count']}x {w['message']}" for w in summary[:limit]]
        if len(summary) > limit:
            out.append(f"  ... and {len(summary) - limit} more")
        return out


class _Hold(logging.Filter):
    def __init__(self, caught: Caught):
        super().__init__()
        self.caught = caught

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == OURS or record.name.startswith(OURS + "."):
            return record.levelno >= logging.WARNING
        if record.levelno < logging.WARNING:
            return True
        if not getattr(record, "_sd_accel_held", False):  # one record passes every handler's filter: count it once
            record._sd_accel_held = True
            self.caught.add(record.name, record.getMessage())
        return False


def _handlers():
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    return {h for lg in loggers for h in lg.handlers}


@contextlib.contextmanager
def captured():
    """Hold back library warnings inside the block; yields the `Caught` tally."""
    with contextlib.suppress(ImportError):  # diffusers installs its log handler on import: import it first
        import diffusers  # noqa: F401
    caught = Caught()
    hold = _Hold(caught)
    handlers = _handlers()
    for h in handlers:
        h.addFilter(hold)
    # Records of loggers without a handler of their own reach logging.lastResort.
    last_resort = logging.lastResort
    if last_resort is not None:
        last_resort.addFilter(hold)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, category, *a, **k: caught.add(category.__name__, str(message))
            yield caught
    finally:
        for h in handlers:
            h.removeFilter(hold)
        if last_resort is not None:
            last_resort.removeFilter(hold)


__all__ = ["Caught", "captured"]
