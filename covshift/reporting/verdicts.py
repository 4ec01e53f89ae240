"""The report's verdict in words: each later run against the first, or one run summed up."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from covshift.metrics import get as get_metric
from covshift.metrics.verdict import compare
from covshift.reporting.comparison import MIN_STEPS
from covshift.reporting.text import fmt


def verdict_metric(metrics: Sequence[str]) -> str:
    """The metric the verdict is stated in: W1 when drawn, else the first metric."""
    return "wasserstein" if "wasserstein" in metrics else metrics[0]

def short_run_note(labels: Sequence[str], steps: Sequence[int], source: str) -> str | None:
    """What to change when a run recorded fewer than :data:`MIN_STEPS` steps (None when none did).

    >>> short_run_note(["a", "b"], [1, 30], "train")
    "Run 'a' recorded 1 train step; drift needs at least 2. Record more often (a smaller every= in covshift.attach(model, every=N)) or train longer."
    """
    short = [f"'{label}' recorded {n} {source} step{'' if n == 1 else 's'}"
             for label, n in zip(labels, steps) if n < MIN_STEPS]
    if not short:
        return None
    return (f"Run {', run '.join(short)}; drift needs at least {MIN_STEPS}. Record more often (a smaller every= "
            "in covshift.attach(model, every=N)) or train longer.")

def verdict_lines(
    table: pd.DataFrame,
    labels: Sequence[str],
    steps: Sequence[int],
    metric: str,
    medians: Sequence[pd.Series] | None = None,
    matches: Sequence[Mapping[str, str]] | None = None,
) -> list[tuple[str, str]]:
    """The verdict as (headline, details): each later run against the first, or a summary of one run.

    From ``metric``'s rows of the summary table (mean drift over the recorded
    steps, channels aggregated by their mean) and, when given, each run's
    ``medians`` (per layer, the same with channels aggregated by their median):
    the verdict then states both (:func:`covshift.metrics.verdict.compare`). Each later run's
    layers are paired with the first run's by ``matches`` (default: by name); pairs of
    different names are named in the details. Runs with fewer than :data:`MIN_STEPS` steps get none.
    """
    rows = table[table["metric"] == metric].set_index("layer")
    name = get_metric(metric).axis_label()
    if len(labels) == 1:
        median = medians[0] if medians is not None else None
        return [_one_run_line(rows, labels[0], name, median)] if steps[0] >= MIN_STEPS else []
    lines = []
    base = labels[0]
    for k, (label, n) in enumerate(zip(labels[1:], steps[1:]), start=1):
        if n < MIN_STEPS or steps[0] < MIN_STEPS:
            continue
        pairs = matches[k - 1] if matches is not None else {layer: layer for layer in rows.index}
        position = {layer: i for i, layer in enumerate(rows.index)}  # model order: the input layer first
        kept = sorted(((other, mine) for other, mine in pairs.items() if other in position and mine in position),
                      key=lambda pair: position[pair[1]])
        theirs, ours = [other for other, _ in kept], [mine for _, mine in kept]
        drift_ours = rows[f"{base} mean"].reindex(ours).to_numpy()
        drift_theirs = rows[f"{label} mean"].reindex(theirs).to_numpy()
        both = ~(pd.isna(drift_ours) | pd.isna(drift_theirs))
        if not both.any():
            lines.append((f"{label} and {base} share no layer: no verdict", ""))
            continue
        ours, theirs = [n for n, b in zip(ours, both) if b], [n for n, b in zip(theirs, both) if b]
        by_median = {}
        if medians is not None:
            by_median = {"baseline_median": medians[0].reindex(ours).tolist(),
                         "other_median": medians[k].reindex(theirs).tolist()}
        v = compare(ours, drift_ours[both].tolist(), drift_theirs[both].tolist(), base, label, **by_median)
        renamed = [f"layer {other} of {label} ↔ layer {mine} of {base}" for other, mine in zip(theirs, ours)
                   if other != mine]
        details = v.details + (f" Layers paired by type and channel count: {'; '.join(renamed)}." if renamed else "")
        lines.append((v.headline, details))
    return lines

def _one_run_line(rows: pd.DataFrame, label: str, name: str, median: pd.Series | None) -> tuple[str, str]:
    drift = rows[f"{label} mean"].dropna()
    if drift.empty:
        return f"{label}: no drift measured", ""
    line = f"{label}: mean {name} drift {fmt(drift.mean())} over {len(drift)} layers"
    if median is not None:
        line += f" by the channel mean, {fmt(median.reindex(drift.index).mean())} by the channel median"
    line += f"; most in layer {drift.idxmax()} ({fmt(drift.max())})"
    ratio = (rows[f"{label} mean"] / rows[f"{label} noise"]).dropna()
    if len(ratio):
        line += f"; {int((ratio > 1).sum())} of {len(ratio)} layers above their noise floor"
    return line, ""
