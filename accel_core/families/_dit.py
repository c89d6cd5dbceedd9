"""What the DiT registrations share: a probe by class name (through the MRO, so a host's
subclass of a family class is the family) and attributes."""
from __future__ import annotations

from torch import nn


def probe(class_names: tuple[str, ...], *attrs: str):
    """A probe: `module`'s class or one of its bases is named one of `class_names`, and it has `attrs`."""
    names = frozenset(class_names)

    def check(module: nn.Module) -> bool:
        return any(c.__name__ in names for c in type(module).__mro__) and all(hasattr(module, a) for a in attrs)

    return check
