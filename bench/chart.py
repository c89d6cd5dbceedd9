"""bench.png: speed-up per row against the baseline of the same run."""
from __future__ import annotations

from .measure import BenchResult


def write_chart(result: BenchResult, path: str) -> str | None:
    from ..accel_core.optional import is_available, warn_missing

    if not is_available("matplotlib"):
        warn_missing("matplotlib", "so the benchmark chart (PNG) is not written")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in result.rows]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.5))
    bars = ax.barh(names[::-1], [r.speedup for r in result.rows][::-1], color="#4c78a8")
    for bar, r in zip(bars, result.rows[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r.speedup:.2f}x  {r.ms_per_step:.1f} ms/step  err {r.rel_err:.3f}", va="center", fontsize=8)
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("speed-up vs baseline (same run)")
    ax.set_title(f"SD Accel bench: {result.preset}, {result.steps} steps, {result.device_name}", fontsize=10)
    ax.set_xlim(0, max(r.speedup for r in result.rows) * 1.6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
