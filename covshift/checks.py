"""Argument checks shared by the public API: one message format for every bad value."""

from __future__ import annotations

from collections.abc import Sequence


#: The largest step index a run stores: steps stay exact as float64 (tables, figures, drift).
MAX_STEP = 2**53 - 1


def check_int(name: str, value: object, minimum: int = 1, maximum: int | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) of at least ``minimum`` (and at most ``maximum``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        what = "a positive int" if minimum == 1 else f"an int of at least {minimum}"
        if maximum is not None:
            what = f"an int from {minimum} to {'2^53 - 1' if maximum == MAX_STEP else maximum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_choice(name: str, value: object, valid: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of the strings ``valid``, listing them."""
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name} must be one of {tuple(valid)}, got {value!r}")
