"""bench.png: speed-up per row against the baseline of the same run; the whisker is the row's
spread (its slowest and fastest timed run against the baseline's median)."""
from __future__ import annotations

import textwrap

from ...accel_core.log import plural
from .measure import BenchResult


def write_chart(result: BenchResult, path: str) -> str | None:
    from ...accel_core.optional import is_available, warn_missing

    if not is_available("matplotlib"):
        warn_missing("matplotlib", "so the benchmark chart (PNG) is not written")
        return None
    figure(result).savefig(path, dpi=110)
    return path


def figure(result: BenchResult):
    """The chart as a matplotlib Figure, laid out so that the title and labels fit inside it."""
    # A Figure of its own (no pyplot): no process-wide backend switch inside a host's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result.rows[::-1]
    fig = Figure(figsize=(10, 0.5 * len(rows) + 2.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = [r.name for r in rows]
    speed = [0.0 if r.failed else r.speedup for r in rows]
    lo = [max(0.0, s - r.speedup_min) if r.speedup_min is not None and not r.failed else 0.0 for s, r in zip(speed, rows)]
    hi = [max(0.0, r.speedup_max - s) if r.speedup_max is not None and not r.failed else 0.0 for s, r in zip(speed, rows)]
    bars = ax.barh(names, speed, xerr=[lo, hi], color="#4c78a8", error_kw={"ecolor": "#222", "capsize": 3, "lw": 1})
    for bar, r, h in zip(bars, rows, hi):
        if r.failed:
            label = " FAILED: " + r.error[:60]
        else:
            spread = f" ({r.speedup_min:.2f}-{r.speedup_max:.2f})" if r.speedup_min is not None and r.runs > 1 else ""
            label = f" {r.speedup:.2f}x{spread}  {r.ms_per_step:.1f} ms/step  err {r.rel_err:.3f}"
        ax.text(bar.get_width() + h, bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=8)
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel(f"speed-up vs baseline (same run): median of {plural(result.repeats, 'timed run')}\nwhisker: slowest..fastest run")
    threads = f", {plural(result.threads, 'thread')}" if result.threads else ""
    title = textwrap.fill(f"SD Accel bench: {result.preset}, {result.steps} steps, {result.device_name}{threads}", 100)
    if result.busy:
        title += "\n" + textwrap.fill("BUSY MACHINE, noisy numbers: " + result.busy_reason, 100)
    # The title goes over the whole figure (a title over the axes starts right of the row names and
    # ran off the right edge); the layout then leaves room for its lines at the top.
    fig.suptitle(title, fontsize=9, color="#a00" if result.busy else "black")
    ax.set_xlim(0, max([s + h for s, h in zip(speed, hi)] + [1.0]) * 1.7)
    fig.tight_layout()
    return fig
