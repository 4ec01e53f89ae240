"""The verdict: how much less one run drifts than another, computed from per-layer drift.

One computation for every place that states it: the report's first screen and
the BatchNorm experiment's ``results.md``. The first layer reads the data
itself (the same input in both networks) and is only a control; the verdict is
over the others, the hidden layers.

Robust aggregation: a layer's drift is an aggregate over its channels, and the
channel mean is dominated by outliers (one channel at 243 beside a median of
1.19 turns a 7.7× verdict into 20.1×). Give :func:`compare` the channel-median
drift too (``baseline_median``/``other_median``, or use :func:`compare_runs`,
which computes both) and the headline states both factors, naming each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from covshift.metrics.api import drift_table


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
    median_factor: float | None = None
    median_lower: int | None = None

    @property
    def headline(self) -> str:
        """The verdict in one line.

        >>> compare(["in", "h1", "h2"], [1.0, 2.0, 4.0], [1.0, 0.5, 2.5], "plain", "bn").headline
        'bn drifts 2.0× less than plain: 2 of 2 hidden layers lower'
        """
        if not self.hidden or not math.isfinite(self.factor) or self.factor <= 0:
            return f"{self.other} and {self.baseline}: no hidden layer of both with finite drift to compare"
        counted = f"{self.lower} of {len(self.hidden)} hidden layers lower"
        if self.median_factor is None:
            if self.factor > 1:
                return f"{self.other} drifts {self.factor:.1f}× less than {self.baseline}: {counted}"
            return f"{self.other} drifts {1 / self.factor:.1f}× more than {self.baseline}: {counted}"
        median = _times(self.median_factor)
        counted_median = f"{self.median_lower} of {len(self.hidden)}"
        return (f"{self.other} drifts {_times(self.factor)} than {self.baseline} by the channel mean "
                f"({counted}), {median} by the channel median ({counted_median} lower)")

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
    baseline_median: Sequence[float] | None = None,
    other_median: Sequence[float] | None = None,
) -> Verdict:
    """The verdict from each layer's drift in two runs (e.g. mean normalized W1 over training).

    Args:
        layers: the layers both runs have, in model order; the first is the input layer.
        baseline: the baseline run's drift of each layer (e.g. without BatchNorm).
        other: the compared run's drift of each layer.
        baseline_name: the baseline run's name in sentences.
        other_name: the compared run's name in sentences.
        baseline_median: optionally, each layer's drift in the baseline run with channels
            aggregated by their median (``baseline`` then holds the channel means).
        other_median: the same for the compared run; give both or neither.

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
        factor = float(np.float64(_nanmean(base[1:][both])) / _nanmean(comp[1:][both]))  # 0 drift: inf or NaN
    median_factor = median_lower = None
    if (baseline_median is None) != (other_median is None):
        raise ValueError("compare takes channel-median drift for both runs or for neither")
    if baseline_median is not None:
        median = compare(layers, baseline_median, other_median, baseline_name, other_name)
        median_factor, median_lower = median.factor, median.lower
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
        median_factor=median_factor,
        median_lower=median_lower,
    )


def compare_runs(
    baseline: Any,
    other: Any,
    baseline_name: str = "no BN",
    other_name: str = "BN",
    metric: str = "wasserstein",
    reference: str | int = "initial",
    source: str = "train",
    match: str = "name",
) -> Verdict:
    """The verdict of two :class:`~covshift.Run` objects, by the channel mean and the channel median.

    Each layer's drift is its ``metric`` against ``reference``, aggregated over
    channels (mean, then median) and averaged over recorded steps, for the layers
    both runs have (:func:`covshift.drift_table`).
    """
    tables = {agg: drift_table(baseline, other, metric, reference, source, match, agg=agg) for agg in ("mean", "median")}
    mean, median = tables["mean"], tables["median"]
    return compare(list(mean["layer_a"]), mean["mean_a"].tolist(), mean["mean_b"].tolist(), baseline_name, other_name,
                   median["mean_a"].tolist(), median["mean_b"].tolist())


def _times(factor: float) -> str:
    """``2.0× less`` or ``1.5× more`` for a factor baseline / other."""
    if not math.isfinite(factor) or factor <= 0:
        return "an undefined factor"
    return f"{factor:.1f}× less" if factor > 1 else f"{1 / factor:.1f}× more"


def _nanmean(values: np.ndarray) -> float:
    """The mean of the non-NaN values; NaN (without a warning) when there are none."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if len(kept) else math.nan
