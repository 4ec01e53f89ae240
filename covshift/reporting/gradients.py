"""The report's view of the backward half: input-gradient percentiles of the detail layers, and gradient-scale flags.

A run recorded with ``attach(..., gradients=True)`` holds records of source
``"grad"``: per channel, the summary of ∂loss/∂(layer input). The report draws
their percentiles like the inputs' and flags a layer whose gradient scale (the
mean over channels of the gradient's standard deviation) is :data:`SCALE_FACTOR`
times below or above the median layer's at the last recorded step (vanishing or
exploding relative to the others), or has moved that far from its own first step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from covshift.record.backward import GRAD_SOURCE
from covshift.reporting.text import fmt
from covshift.store.run import Run

#: How far a layer's gradient scale must stand from the median layer's (or its own start) to be flagged.
SCALE_FACTOR = 100.0


def has_gradients(run: Run) -> bool:
    """Whether ``run`` recorded input gradients."""
    return GRAD_SOURCE in run.sources().index


def gradient_scale(run: Run) -> pd.DataFrame:
    """Per recorded step (rows) and layer (columns): the mean over channels of the input gradient's std."""
    stats = run.stats(GRAD_SOURCE, columns=["var"])
    stats = stats.assign(sd=np.sqrt(stats["var"].to_numpy()), layer=stats["layer"].astype(str))
    return stats.groupby(["step", "layer"], sort=True)["sd"].mean().unstack()


def scale_flags(scale: pd.DataFrame, label: str, factor: float = SCALE_FACTOR) -> list[str]:
    """Sentences for the layers whose gradient scale collapses or explodes, relative to the others or its start.

    >>> scale = pd.DataFrame({"a": [1.0, 1.0], "b": [1.0, 2.0], "c": [1.0, 0.001]}, index=[0, 9])
    >>> scale_flags(scale, "plain")
    ["plain: layer c's input gradient is 1,000× smaller than the median layer's at step 9 (vanishing), 1,000× smaller than at step 0"]
    """
    if scale.empty:
        return []
    first, last = scale.iloc[0], scale.iloc[-1]
    median = float(last.dropna().median())
    flags = []
    for layer in scale.columns:
        value = last[layer]
        if not np.isfinite(value):
            continue
        said = []
        if median > 0 and value < median / factor:
            said.append(f"{fmt(median / value)}× smaller than the median layer's at step {scale.index[-1]} (vanishing)")
        elif value > median * factor:
            said.append(f"{fmt(value / median)}× larger than the median layer's at step {scale.index[-1]} (exploding)")
        start = first[layer]
        if np.isfinite(start) and start > 0 and len(scale) > 1:
            if value < start / factor:
                said.append(f"{fmt(start / value)}× smaller than at step {scale.index[0]}")
            elif value > start * factor:
                said.append(f"{fmt(value / start)}× larger than at step {scale.index[0]}")
        if said:
            flags.append(f"{label}: layer {layer}'s input gradient is {', '.join(said)}")
    return flags


def gradient_view(
    runs: Sequence[Run],
    labels: Sequence[str],
    layers: Sequence[str],
    percentiles_of: Callable[[pd.DataFrame], pd.DataFrame],
) -> tuple[list[pd.DataFrame], list[str]]:
    """Per run, the input-gradient percentiles of ``layers`` (``percentiles_of(stats)``), and every run's flags."""
    frames, flags = [], []
    for run, label in zip(runs, labels):
        if not has_gradients(run):
            frames.append(pd.DataFrame({"step": pd.Series(dtype=int), "layer": pd.Series(dtype=str)}))
            continue
        recorded = [layer for layer in layers if layer in set(run.layers["layer"].astype(str))]
        stats = run.stats(GRAD_SOURCE, layers=recorded) if recorded else run.stats(GRAD_SOURCE).iloc[:0]
        frames.append(percentiles_of(stats))
        flags += scale_flags(gradient_scale(run), label)
    return frames, flags
