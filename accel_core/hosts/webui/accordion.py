"""What the accordion sends, read into WebuiOptions: its positional args, LoRA lists, and the XYZ plot's per-image overrides."""
from __future__ import annotations

from dataclasses import replace

from ...errors import SDAccelError
from .options import UI_FIELDS, WebuiOptions


def parse_loras(text: str) -> tuple[tuple[str, float], ...]:
    """"name:0.8, other" -> (("name", 0.8), ("other", 1.0)). Names may contain colons; the weight is after the last one."""
    out = []
    for item in (text or "").replace(";", ",").replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        name, weight = item, 1.0
        if ":" in item:
            head, tail = item.rsplit(":", 1)
            try:
                name, weight = head.strip(), float(tail)
            except ValueError:
                pass  # "sdxl:lora" style name without a weight
        if not name:
            raise SDAccelError(f"SD Accel: LoRA list entry {item!r} has no name; expected 'name:weight' entries separated by commas.")
        out.append((name, weight))
    return tuple(out)


def format_loras(loras) -> str:
    return ", ".join(f"{n}:{format_num(s)}" for n, s in loras)


def format_num(x: float) -> str:
    return f"{float(x):g}"


def options_from_args(args, defaults: WebuiOptions | None = None) -> WebuiOptions:
    """Build options from the script's positional args (UI_FIELDS order; fewer args keep defaults)."""
    base = defaults or WebuiOptions()
    values = {}
    for name, value in zip(UI_FIELDS, args):
        if name == "loras" and isinstance(value, str):
            value = parse_loras(value)
        values[name] = value
    return replace(base, **values)


def with_overrides(opts: WebuiOptions, overrides: dict | None) -> WebuiOptions:
    """Apply per-image overrides (the XYZ plot sets them on `p`); an override of an SD Accel option also enables it."""
    if not overrides:
        return opts
    values = dict(overrides)
    if "loras" in values and isinstance(values["loras"], str):
        values["loras"] = parse_loras(values["loras"])
    unknown = set(values) - set(UI_FIELDS)
    if unknown:
        raise SDAccelError(f"SD Accel: unknown option(s) {', '.join(sorted(unknown))}; expected some of {', '.join(UI_FIELDS)}.")
    values.setdefault("enabled", True)
    return replace(opts, **values)


__all__ = ["parse_loras", "format_loras", "format_num", "options_from_args", "with_overrides"]
