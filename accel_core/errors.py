"""Errors the user can cause. Each message says what was expected, what was found and what to do."""


class SDAccelError(ValueError):
    """Bad input from the user (unknown option, wrong file, wrong architecture).

    Raised before anything is patched, so the model the user passed in stays untouched.
    """


def choice_error(what: str, value, choices) -> SDAccelError:
    return SDAccelError(
        f"SD Accel: unknown {what} {value!r}; expected one of {', '.join(map(str, choices))}. "
        f"Pick one of those in the node (or the --{what.replace(' ', '-')} option)."
    )


def is_number(value) -> bool:
    """A finite int or float (bool is not a number here: True as a strength is a mistake)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")


def check_flag(where: str, name: str, value, todo: str):
    if not isinstance(value, bool):
        raise SDAccelError(f"SD Accel {where}: {name} must be True or False, found {value!r}. {todo}")


def check_range(where: str, name: str, value, lo: float, hi: float, todo: str, lo_open: bool = False):
    """A finite number in [lo, hi] ((lo, hi] with lo_open)."""
    ok = is_number(value) and (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise SDAccelError(f"SD Accel {where}: {name} must be a number in {span}, found {value!r}. {todo}")
