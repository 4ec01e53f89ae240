"""Numbers and references in words, as every part of the report writes them."""

from __future__ import annotations

import math

from covshift.metrics.engine import parse_reference


def fmt(value: object) -> str:
    """A number at 3 significant figures (thousands whole, with separators); – for a missing one.

    >>> [fmt(v) for v in (0.5, 0.0421234, 23.71, 12345.6, float("nan"), None)]
    ['0.500', '0.0421', '23.7', '12,346', '–', '–']
    """
    if value is None:
        return "–"
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        return "–" if math.isnan(number) else "∞" if number > 0 else "−∞"
    return f"{number:,.0f}" if abs(number) >= 1000 else f"{number:#.3g}"


def reference_words(reference: str | int) -> str:
    """What drift is measured from, in words.

    >>> reference_words("rolling:5")
    'mean of the previous 5 recorded steps'
    """
    label, number = parse_reference(reference)
    if label in ("initial", "previous"):
        return f"{'first' if label == 'initial' else 'previous'} recorded step"
    if label.startswith("rolling:"):
        return f"mean of the previous {number} recorded steps"
    return f"step {number}"
