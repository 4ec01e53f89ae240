"""The report's verdict in words: each later run against the first, or one run summed up."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from covshift.metrics import get as get_metric
from covshift.metrics.seeds import seed_spread
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


def seed_groups(names: Sequence[str]) -> dict[str, list[int]]:
    """The runs of each name, by position, when some name is given to several runs (their seeds); else ``{}``.

    >>> seed_groups(["plain", "plain", "bn", "bn"])
    {'plain': [0, 1], 'bn': [2, 3]}
    >>> seed_groups(["plain", "bn"])
    {}
    """
    groups: dict[str, list[int]] = {}
    for k, name in enumerate(names):
        groups.setdefault(name, []).append(k)
    return groups if any(len(runs) > 1 for runs in groups.values()) else {}


def seed_verdict_lines(
    table: pd.DataFrame,
    names: Sequence[str],
    labels: Sequence[str],
    steps: Sequence[int],
    metric: str,
    medians: Sequence[pd.Series],
) -> list[tuple[str, str]]:
    """The verdict over seeds: runs of one name are seeds of one network; the first name is the baseline.

    The i-th run of every other name is compared with the i-th run of the first name (layers
    paired by name; runs with fewer than :data:`MIN_STEPS` steps left out), each pair's factor
    (baseline drift / other drift, over hidden layers, :func:`covshift.metrics.verdict.compare`)
    by the channel median and by the channel mean; the line states their median over the
    pairs with min–max and a percentile bootstrap interval (:func:`covshift.metrics.seeds.seed_spread`),
    the details each pair's factor. Empty when no name has several runs.
    """
    groups = seed_groups(names)
    if not groups:
        return []
    rows = table[table["metric"] == metric].set_index("layer")
    label = get_metric(metric).axis_label()
    base, *others = groups
    lines = []
    for other in others:
        by_agg: dict[str, list[float]] = {"median": [], "mean": []}
        for mine, theirs in zip(groups[base], groups[other]):
            if min(steps[mine], steps[theirs]) < MIN_STEPS:
                continue
            a, b = rows[f"{labels[mine]} mean"], rows[f"{labels[theirs]} mean"]
            layers = [layer for layer in rows.index if not (pd.isna(a[layer]) or pd.isna(b[layer]))]
            if len(layers) < 2:
                continue
            v = compare(layers, a[layers].tolist(), b[layers].tolist(), base, other,
                        medians[mine].reindex(layers).tolist(), medians[theirs].reindex(layers).tolist())
            by_agg["median"].append(v.median_factor)
            by_agg["mean"].append(v.factor)
        if not by_agg["mean"]:
            continue
        spread = {agg: seed_spread(values) for agg, values in by_agg.items()}
        head = (f"{base}/{other} mean {label} drift over hidden layers, {spread['median'].n} seeds paired in order "
                f"(above 1: {other} drifts less): {spread['median'].describe('×')} by the channel median; "
                f"{spread['mean'].describe('×')} by the channel mean")
        details = "Per seed, by the channel median: " + ", ".join(f"{f:.2f}×" for f in by_agg["median"]) + \
                  "; by the channel mean: " + ", ".join(f"{f:.2f}×" for f in by_agg["mean"]) + "."
        lines.append((head, details))
    return lines
