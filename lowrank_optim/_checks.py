"""Argument checks shared by the package: each error names the bad value and what is allowed."""
from __future__ import annotations

__all__ = ["is_int", "check", "check_int"]


def is_int(v) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(v, int) and not isinstance(v, bool)


def check(cond: bool, name: str, value, allowed: str) -> None:
    """Raise ``ValueError("Invalid {name}: {value!r} (expected {allowed})")`` unless ``cond``."""
    if not cond:
        raise ValueError(f"Invalid {name}: {value!r} (expected {allowed})")


def check_int(name: str, value, least: int = 1) -> None:
    """``value`` must be an int >= ``least`` (1: "a positive int")."""
    check(is_int(value) and value >= least, name, value,
          "a positive int" if least == 1 else f"an int >= {least}")
