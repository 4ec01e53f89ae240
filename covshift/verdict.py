"""The verdict: how much less one run drifts than another, computed from per-layer drift.

One computation for every place that states it: the report's first screen and
the BatchNorm experiment's ``results.md``. The first layer reads the data
itself (the same input in both networks) and is only a control; the verdict is
over the others, the hidden layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Verdict:
    """Per-layer drift of ``other`` against ``baseline``, summed up over the hidden layers.

    ``factor`` is the baseline's mean drift over the hidden layers with a value
    in both runs divided by the other run's (above 1: the other run drifts less); ``lower`` counts the
    hidden layers where the other run drifts less; ``ratio_min``/``ratio_max``
    span the per-layer ratios other / baseline; ``input_ratio`` is that ratio
    on the input layer.
    """

    baseline: str
    other: str
    input_layer: str
    input_ratio: float
    hidden: tuple[str, ...]
    factor: float
    lower: int
    ratio_min: float
    ratio_max: float

    @property
    def headline(self) -> str:
        """The verdict in one line.

        >>> compare(["in", "h1", "h2"], [1.0, 2.0, 4.0], [1.0, 0.5, 2.5], "plain", "bn").headline
        'bn drifts 2.0× less than plain: 2 of 2 hidden layers lower'
        """
        if not self.hidden or not math.isfinite(self.factor) or self.factor <= 0:
            return f"{self.other} and {self.baseline}: no hidden layer of both with finite drift to compare"
        counted = f"{self.lower} of {len(self.hidden)} hidden layers lower"
        if self.factor > 1:
            return f"{self.other} drifts {self.factor:.1f}× less than {self.baseline}: {counted}"
        return f"{self.other} drifts {1 / self.factor:.1f}× more than {self.baseline}: {counted}"

    @property
    def details(self) -> str:
        """The per-layer spread and the input layer's control ratio.

        >>> compare(["in", "h1", "h2"], [1.0, 2.0, 4.0], [1.0, 0.5, 2.5], "plain", "bn").details
        'Per-layer bn/plain ratios 0.25–0.62. Input layer in, which reads the data itself: bn/plain 1.00.'
        """
        ratio = f"{self.other}/{self.baseline}"
        spread = f"Per-layer {ratio} ratios {self.ratio_min:.2f}–{self.ratio_max:.2f}. " if self.hidden else ""
        return f"{spread}Input layer {self.input_layer}, which reads the data itself: {ratio} {self.input_ratio:.2f}."


def compare(
    layers: Sequence[str],
    baseline: Sequence[float],
    other: Sequence[float],
    baseline_name: str = "no BN",
    other_name: str = "BN",
) -> Verdict:
    """The verdict from each layer's drift in two runs (e.g. mean normalized W1 over training).

    Args:
        layers: the layers both runs have, in model order; the first is the input layer.
        baseline: the baseline run's drift of each layer (e.g. without BatchNorm).
        other: the compared run's drift of each layer.
        baseline_name: the baseline run's name in sentences.
        other_name: the compared run's name in sentences.

    Raises:
        ValueError: no layers, or lengths that differ.
    """
    if not len(layers) or not len(layers) == len(baseline) == len(other):
        raise ValueError(f"compare needs one drift value per layer in each run, got {len(layers)} layers, "
                         f"{len(baseline)} and {len(other)} values")
    base = np.asarray(baseline, dtype=float)
    comp = np.asarray(other, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = comp / base
        hidden_ratios = ratios[1:]
        finite = hidden_ratios[np.isfinite(hidden_ratios)]
        both = ~np.isnan(base[1:]) & ~np.isnan(comp[1:])  # a layer without a value in one run is left out
        factor = _nanmean(base[1:][both]) / _nanmean(comp[1:][both])
    return Verdict(
        baseline=baseline_name,
        other=other_name,
        input_layer=str(layers[0]),
        input_ratio=float(ratios[0]),
        hidden=tuple(map(str, layers[1:])),
        factor=factor,
        lower=int(np.sum(comp[1:] < base[1:])),
        ratio_min=float(finite.min()) if len(finite) else math.nan,
        ratio_max=float(finite.max()) if len(finite) else math.nan,
    )


def _nanmean(values: np.ndarray) -> float:
    """The mean of the non-NaN values; NaN (without a warning) when there are none."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if len(kept) else math.nan
