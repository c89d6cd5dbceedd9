"""Options declared once, on the config dataclass that uses them; every surface derives from that.

A config field made with `option(default, help, ...)` carries its label, range (min / max /
step), choices and help in its metadata. The ComfyUI nodes build their inputs with
`comfy_input`, the webui its accordion, Settings page and infotext from `declared`, the CLI its
arguments with `cli_argument`, and `check_declared` validates a config against the same
numbers. Where a host needs another default or choice (the webui's accordion starts with
everything off), the declaration says so in `hosts`, next to the rest, with the reason.

Plain data: no host is imported here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from .errors import SDAccelError, check_range, choice_error, is_number

KEY = "sd_accel.option"
HOSTS = ("comfy", "webui", "cli")
_OVERRIDABLE = ("default", "choices", "min", "max", "step", "label", "round", "help")


@dataclass(frozen=True)
class Option:
    """One user-facing option: what every surface shows and what the config accepts."""

    default: Any
    help: str
    label: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple | None = None
    round: float | None = None  # ComfyUI's display rounding of a FLOAT widget (None: its step)
    per_model: bool = False  # the real maximum depends on the model and is checked against it; `max` is the largest a supported one has
    hosts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    name: str = ""  # the config field's name, filled in by `declared`

    @property
    def kind(self) -> str:
        """The widget kind: COMBO, BOOLEAN, INT, FLOAT or STRING."""
        if self.choices is not None:
            return "COMBO"
        if isinstance(self.default, bool):
            return "BOOLEAN"
        if isinstance(self.default, int):
            return "INT"
        if isinstance(self.default, float):
            return "FLOAT"
        return "STRING"

    def on(self, host: str) -> "Option":
        """This option as `host` shows it (its overrides applied)."""
        if host not in HOSTS:
            raise ValueError(f"unknown host {host!r}; expected one of {HOSTS}")
        return replace(self, **dict(self.hosts.get(host, {})), hosts={})

    def check(self, where: str, value, todo: str = "") -> None:
        """Raise SDAccelError when `value` is outside the declared choices or range."""
        if self.choices is not None:
            if value not in self.choices:
                raise choice_error(self.name.replace("_", " "), value, self.choices)
        elif self.kind == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
            raise SDAccelError(f"SD Accel {where}: {self.name} must be a whole number, found {value!r}. {todo or f'Use {self.default!r}.'}")
        if self.kind in ("INT", "FLOAT") and self.min is not None and self.max is not None:
            hi = float("inf") if self.per_model else self.max
            if not (is_number(value) and self.min <= value <= hi):
                check_range(where, self.name, value, self.min, self.max, todo or f"Use {self.default!r}.")


def option(default, help: str, *, label: str, min=None, max=None, step=None, choices=None, round=None, per_model=False, hosts=None):
    """A dataclass field declaring a user-facing option (see the module docstring)."""
    for host, over in (hosts or {}).items():
        bad = set(over) - set(_OVERRIDABLE)
        if host not in HOSTS or bad:
            raise ValueError(f"option hosts: unknown host {host!r} or keys {sorted(bad)}; expected {HOSTS} and {_OVERRIDABLE}")
    opt = Option(default, help, label, min, max, step, tuple(choices) if choices is not None else None, round, per_model, dict(hosts or {}))
    return field(default=default, metadata={KEY: opt})


def declared(config, host: str | None = None) -> dict[str, Option]:
    """name -> Option for every declared option of a config class (or instance), in field order; as `host` shows it."""
    out = {}
    for f in dataclasses.fields(config):
        opt = f.metadata.get(KEY)
        if opt is not None:
            opt = replace(opt, name=f.name)
            out[f.name] = opt.on(host) if host else opt
    return out


def check_declared(config, where: str) -> None:
    """Validate every declared option of a config instance against its declaration."""
    for name, opt in declared(config).items():
        opt.check(where, getattr(config, name))


# --- surfaces --------------------------------------------------------------------------------

def comfy_input(config, name: str) -> tuple:
    """The ComfyUI INPUT_TYPES entry of one declared option: (type or choice list, {default, range, tooltip})."""
    opt = declared(config, "comfy")[name]
    spec = {"default": opt.default}
    if opt.kind in ("INT", "FLOAT"):
        spec.update({k: getattr(opt, k) for k in ("min", "max", "step", "round") if getattr(opt, k) is not None})
    spec["tooltip"] = opt.help
    return (list(opt.choices) if opt.kind == "COMBO" else opt.kind, spec)


def comfy_inputs(config, *names: str) -> dict:
    """INPUT_TYPES entries for `names` (all declared options when none are named), in that order."""
    return {n: comfy_input(config, n) for n in (names or declared(config))}


def cli_argument(parser, config, name: str, flag: str | None = None, **extra):
    """Add `--name` (or `flag`) for one declared option to an argparse parser, with its default, choices and help."""
    opt = declared(config, "cli")[name]
    kw = {"default": opt.default, "help": opt.help}
    if opt.kind == "COMBO":
        kw["choices"] = list(opt.choices)
    elif opt.kind in ("INT", "FLOAT"):
        kw["type"] = int if opt.kind == "INT" else float
    kw.update(extra)
    action = parser.add_argument(flag or "--" + name.replace("_", "-"), **kw)
    action.sd_accel_option = (config, name)  # what it shows, for the test that holds surfaces to declarations
    return action


__all__ = ["Option", "option", "declared", "check_declared", "comfy_input", "comfy_inputs", "cli_argument", "HOSTS", "SDAccelError"]
