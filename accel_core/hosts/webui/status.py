"""What SD Accel can do in this webui and what the last generation applied (the infotext status and the tab)."""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field

from ...backends import BACKENDS
from ...compiling import CompileReport
from .infotext import to_infotext
from .options import WebuiOptions

# Feature modules written alongside the compile/cast core; a copy of SD Accel may lack one.
FEATURES = {"deepcache": "DeepCache", "lora": "LoRA hot-swap", "lcm": "LCM-LoRA"}
_MODULES = {"deepcache": "deepcaching"}  # the runtime's module where its name is not the feature's (accel_core.deepcache is a verb)


@functools.lru_cache(maxsize=None)
def feature_module(name: str):
    """The core module for a feature, or None when this copy of SD Accel does not have it."""
    try:
        return importlib.import_module(f"{__package__.rsplit('.', 2)[0]}.{_MODULES.get(name, name)}")
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(f".{_MODULES.get(name, name)}"):
            return None
        raise


def feature_status() -> dict[str, str | None]:
    """feature -> None when usable, else the reason it is not."""
    out = {}
    for name, label in FEATURES.items():
        try:
            mod = feature_module(name)
        except Exception as e:  # a broken optional module must not take the UI down
            out[name] = f"{label} failed to import: {type(e).__name__}: {e}"
            continue
        out[name] = None if mod is not None else f"{label} is not part of this SD Accel version yet."
    return out


@dataclass
class Applied:
    """What was applied for one generation, for the infotext status and the tab."""

    host: str
    options: WebuiOptions
    notes: list[str] = field(default_factory=list)
    compile_report: CompileReport | None = None  # the report only: an Applied must not keep a UNet alive
    lora: str | None = None  # the hot-swap report (A1111; on Forge the weights change at the first UNet call)
    dit: bool = False  # a DiT model: the cache controls ran the Step Cache (its infotext entry)

    def status(self) -> str | None:
        """The infotext status: what did not go as asked (None when everything applied cleanly)."""
        parts = list(self.notes)
        r = self.compile_report
        if r is not None and r.status in ("partial", "eager"):
            parts.append(f"compile {r.status}: {len(r.fallbacks)} block(s) eager")
        return "; ".join(parts) or None

    def describe(self) -> str:
        lines = [f"{self.host}: " + (", ".join(f"{k[len('SD Accel '):]}: {v}" for k, v in to_infotext(self.options, dit=self.dit).items()) or "nothing")]
        if self.compile_report is not None:
            lines.append("compile: " + self.compile_report.summary())
        if self.lora:
            lines.append("LoRA: " + self.lora)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def unavailable_notes(opts: WebuiOptions) -> list[str]:
    notes = []
    status = feature_status()
    for name, on in (("deepcache", opts.deepcache_on), ("lora", opts.loras_on), ("lcm", opts.lcm_on)):
        if on and status[name]:
            notes.append(f"{FEATURES[name]} not applied: {status[name]}")
    return notes


def backend_table() -> list[list[str]]:
    """Rows for the tab: backend, available on CUDA, available on CPU, what is missing."""
    from ...optional import INSTALL_HINTS

    rows = []
    for name, b in BACKENDS.items():
        cuda, cpu = b.available("cuda"), b.available("cpu")
        missing = "" if cuda else b.missing("cuda")
        hint = INSTALL_HINTS.get(missing, "") if missing else ""
        rows.append([name, "yes" if cuda else "no", "yes" if cpu else "no", f"{missing}{': ' + hint if hint else ''}"])
    return rows


__all__ = ["FEATURES", "feature_module", "feature_status", "Applied", "unavailable_notes", "backend_table"]
