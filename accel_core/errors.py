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
