import logging

logger = logging.getLogger("sd_accel")


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 file', '2 files' (or `many` for an irregular plural)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"
