"""Runs side by side: their layers paired (:func:`match_layers`) and the per-layer comparison table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
from pandas.core.groupby import SeriesGroupBy

from covshift.store.run import Run

#: Runs with fewer recorded steps than this have no drift.
MIN_STEPS = 2


def match_layers(first: Run, other: Run, explicit: Mapping[str, str] | None = None) -> dict[str, str]:
    """``other``'s layers paired with ``first``'s, as ``{other's layer: first's layer}``.

    The ``explicit`` pairs first (``{other's layer: first's layer}``); then layers of the
    same name, type and channel count; then, among the layers left, the k-th of each
    (type, channel count) in model order with the k-th: ``Linear(20, 64), ReLU,
    Linear(64, 2)`` against ``Linear(20, 64), BatchNorm1d(64), ReLU, Linear(64, 2)``
    pairs layer 2 with layer 3.

    Raises:
        ValueError: an explicit pair names a layer one of the runs did not record.
    """
    mine, theirs = first.layers, other.layers
    kinds_mine = {str(n): (t, int(c)) for n, t, c in zip(mine["layer"], mine["type"], mine["channels"])}
    kinds_theirs = {str(n): (t, int(c)) for n, t, c in zip(theirs["layer"], theirs["type"], theirs["channels"])}
    pairs: dict[str, str] = {}
    for other_layer, first_layer in (explicit or {}).items():
        for layer, kinds, run in ((other_layer, kinds_theirs, other), (first_layer, kinds_mine, first)):
            if layer not in kinds:
                raise ValueError(f"match names layer {layer!r}, which run {run.name!r} did not record; "
                                 f"it recorded {', '.join(kinds)}")
        pairs[str(other_layer)] = str(first_layer)
    taken = set(pairs.values())
    for layer, kind in kinds_theirs.items():
        if layer not in pairs and layer not in taken and kinds_mine.get(layer) == kind:
            pairs[layer] = layer
            taken.add(layer)
    left_mine: dict[tuple, list[str]] = {}
    for layer, kind in kinds_mine.items():
        if layer not in taken:
            left_mine.setdefault(kind, []).append(layer)
    for layer, kind in kinds_theirs.items():
        if layer not in pairs and left_mine.get(kind):
            pairs[layer] = left_mine[kind].pop(0)
    return pairs

def comparison_table(
    drifts: Sequence[pd.DataFrame],
    noises: Sequence[pd.DataFrame | None],
    labels: Sequence[str],
    layers: Sequence[str],
    metrics: Sequence[str],
    matches: Sequence[Mapping[str, str]] | None = None,
) -> pd.DataFrame:
    """Per (metric, layer): each run's mean drift over all its steps, its drift at its last step, its noise floor.

    ``{run} noise`` is the run's noise floor averaged over its probe steps (NaN
    without a probe). With several runs, ``{run}/{first} mean`` and ``… final``
    give each later run's value divided by the first run's (below 1: it drifts less),
    on the first run's layer's row, the later run's layer paired with it by ``matches``
    (one ``{its layer: the first run's}`` per later run; default: by name).
    """
    columns: dict[str, pd.Series] = {}
    for frame, noise, label in zip(drifts, noises, labels):
        grouped = _by_metric_layer(frame.sort_values("step"))
        columns[f"{label} mean"], columns[f"{label} final"] = grouped.mean(), grouped.last()
        columns[f"{label} noise"] = _by_metric_layer(noise).mean() if noise is not None else pd.Series(dtype=float)
    index = pd.MultiIndex.from_product([list(metrics), list(layers)], names=["metric", "layer"])
    table = pd.DataFrame({name: column.reindex(index) for name, column in columns.items()}, index=index)
    first = labels[0]
    for k, label in enumerate(labels[1:]):
        pairs = matches[k] if matches is not None else {name: name for name in layers}
        to_other = {base: other for other, base in pairs.items()}
        rows = pd.MultiIndex.from_tuples([(m, to_other.get(layer, "")) for m, layer in table.index])
        for kind in ("mean", "final"):
            other = table[f"{label} {kind}"].reindex(rows).to_numpy()
            table[f"{label}/{first} {kind}"] = other / table[f"{first} {kind}"].to_numpy()
    return table.dropna(how="all").reset_index()

def _by_metric_layer(frame: pd.DataFrame) -> SeriesGroupBy:
    return frame.groupby([frame["metric"], frame["layer"].astype(str)])["value"]

def without_short_runs(table: pd.DataFrame, labels: Sequence[str], steps: Sequence[int]) -> pd.DataFrame:
    """``table`` with the drift of runs of fewer than :data:`MIN_STEPS` steps blanked (their 0 is no measurement)."""
    short = {label for label, n in zip(labels, steps) if n < MIN_STEPS}
    first = labels[0]
    blank = [f"{label} {kind}" for label in short for kind in ("mean", "final")]
    blank += [f"{label}/{first} {kind}" for label in labels[1:] if short & {label, first} for kind in ("mean", "final")]
    return table.assign(**{c: float("nan") for c in blank if c in table.columns})
