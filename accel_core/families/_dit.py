"""What the DiT registrations share: a probe by class name (through the MRO, so a host's
subclass of a family class is the family) and attributes."""
from __future__ import annotations

from torch import nn


def probe(class_names: tuple[str, ...], *attrs: str, unless: tuple[str, ...] = ()):
    """A probe: `module`'s class or one of its bases is named one of `class_names`, and it has `attrs`;
    none of its classes is named one of `unless` (a subclass of another architecture, e.g. LTX-2's
    audio-video model, a subclass of LTX-Video's)."""
    names, excluded = frozenset(class_names), frozenset(unless)

    def check(module: nn.Module) -> bool:
        mro = {c.__name__ for c in type(module).__mro__}
        return bool(mro & names) and not mro & excluded and all(hasattr(module, a) for a in attrs)

    return check
