"""`drift()` and its siblings: drift metrics of a run's per-channel summaries, as tidy DataFrames.

Also the noise floor (:func:`noise_floor`, :func:`drift_to_noise`) and the
side-by-side table of two runs (:func:`drift_table`). The metrics are declared in
:mod:`covshift.metrics.registry`; :mod:`covshift.metrics.engine` pairs each record
with its reference and computes them. Definitions, accuracy and conventions:
``docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from covshift.checks import check_choice
from covshift.metrics.arrays import RecordArrays, RunLike, layer_batches, layer_order, read_arrays
from covshift.metrics.engine import AGGREGATES, BY, compute, matching_rows, parse_reference, reference_rows, tidy
from covshift.metrics.registry import Metric, names, resolve
from covshift.store.run import Run

MATCHES = ("name", "type")


def drift(
    run: RunLike,
    metric: str | Sequence[str] = "wasserstein",
    reference: str | int = "initial",
    normalize: bool = True,
    by: str = "layer",
    agg: str = "mean",
    source: str = "train",
) -> pd.DataFrame:
    """Drift of every recorded layer input from a reference, per step.

    Args:
        run: a :class:`~covshift.Run`, or a DataFrame shaped like ``run.stats()``.
        metric: a name from :func:`covshift.metrics.names` (covshift's own or one you
            registered), a list of them, or ``"all"``.
        reference: ``"initial"`` (each channel's first recorded step), ``"previous"``
            (the previous recorded step), an int step, or ``"rolling:K"`` (the
            Wasserstein barycenter of the K previous recorded steps: quantiles,
            bin means, means and standard deviations averaged). Steps without a
            reference (the first one for ``"previous"``, the first K for
            ``"rolling:K"``) are left out.
        normalize: divide ``mean_shift``, ``wasserstein`` and ``gaussian_w2`` by
            the reference's standard deviation (the others are scale-free).
        by: ``"layer"`` aggregates channels with ``agg``; ``"channel"`` keeps them.
        agg: ``"mean"``, ``"median"`` or ``"max"`` over a layer's channels.
        source: ``"train"``, ``"probe"``, ``"probe_a"`` or ``"probe_b"``.

    Returns:
        Tidy rows ``step, layer, [channel], metric, reference, value``; with
        ``by="layer"`` also ``channels`` (channels aggregated) and ``excluded``
        (channels left out because they, or their reference, have zero variance:
        constant, e.g. a dead ReLU, or empty; and for the quantile metrics
        ``wasserstein, ks, psi, js``, channels outside the layer's sketched subset,
        see ``attach(sketch_channels=)``; their ``by="channel"`` value is NaN).

    Raises:
        ValueError: an unknown metric, reference, by, agg or source, or a run
            without records of ``source``; the message lists the valid values.

    >>> import torch, covshift
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> with covshift.attach(model, every=1) as tracker:
    ...     for shift in (0.0, 1.0):  # the same batch, shifted by one unit at step 1
    ...         _ = model(torch.randn(500, 3, generator=torch.Generator().manual_seed(0)) + shift)
    >>> drift(tracker.run, "mean_shift", normalize=False)[["step", "layer", "value", "channels"]]
       step layer  value  channels
    0     0     0    0.0         3
    1     1     0    1.0         3
    """
    metrics = resolve(metric)
    label, _ = parse_reference(reference)
    check_choice("by", by, BY)
    check_choice("agg", agg, AGGREGATES)
    if not isinstance(run, Run):
        return _drift_of(read_arrays(run, source, metrics), metrics, reference, normalize, label, by, agg)
    parts = [
        _drift_of(read_arrays(frame, source, metrics, order=layer_order(run)), metrics, reference, normalize, label, by, agg)
        for frame in layer_batches(run, source, metrics)
    ]
    frame = pd.concat(parts, ignore_index=True)
    keys = [frame["channel"].to_numpy()] if by == "channel" else []
    rank = frame["metric"].map({metric.name: i for i, metric in enumerate(metrics)}).to_numpy()
    rows = np.lexsort((*keys, frame["layer"].cat.codes.to_numpy(), frame["step"].to_numpy(), rank))
    return frame.take(rows).reset_index(drop=True)


def _drift_of(
    found: tuple[RecordArrays, list[str]],
    metrics: tuple[Metric, ...],
    reference: str | int,
    normalize: bool,
    label: str,
    by: str,
    agg: str,
) -> pd.DataFrame:
    """:func:`drift` of summaries already read."""
    arrays, layers = found
    cur, refs = reference_rows(arrays, reference)
    order = np.argsort(cur, kind="stable")  # records in stored order: contiguous blocks
    cur, refs = cur[order], [r[order] for r in refs]
    values, ok = compute(arrays, arrays, cur, refs, metrics, normalize)
    return tidy(arrays, layers, cur, values, ok, label, by, agg)



def noise_floor(
    run: RunLike,
    metric: str | Sequence[str] = "wasserstein",
    normalize: bool = True,
    by: str = "layer",
    agg: str = "mean",
) -> pd.DataFrame:
    """The metric between the two disjoint halves of the probe batch, at each probe step.

    Both halves go through the same weights at the same step (sources
    ``"probe_a"`` and ``"probe_b"``), so the distance between them is pure
    sampling noise: the drift a metric shows with no parameter change. Half ``a``
    plays the current distribution and half ``b`` the reference (its standard
    deviation normalizes). Each half holds half the probe batch, so the floor
    belongs to that sample size.

    Returns:
        The columns of :func:`drift`, with ``reference="probe halves"``.

    Raises:
        ValueError: the run has no probe records (see ``tracker.probe``), or an
            unknown metric, by or agg.
    """
    metrics = resolve(metric)
    check_choice("by", by, BY)
    check_choice("agg", agg, AGGREGATES)
    hint = "record a probe with tracker.probe(batch)"
    half_a, layers = read_arrays(run, "probe_a", metrics, hint)
    half_b, _ = read_arrays(run, "probe_b", metrics, hint)
    return drift_between(half_a, half_b, layers, metrics, "probe halves", normalize=normalize, by=by, agg=agg)


def drift_between(
    current: RecordArrays,
    reference: RecordArrays,
    layers: list[str],
    metrics: tuple[Metric, ...],
    label: str,
    *,
    normalize: bool = True,
    by: str = "layer",
    agg: str = "mean",
) -> pd.DataFrame:
    """The metrics between the records of ``current`` and ``reference`` that share a (step, layer, channel).

    Two samples of one distribution (the probe's halves, random splits of a batch) give its noise floor.
    """
    cur, ref = matching_rows(current, reference)
    values, ok = compute(current, reference, cur, [ref], metrics, normalize)
    return tidy(current, layers, cur, values, ok, label, by, agg)


def beside_floor(layer_drift: pd.DataFrame, floor: pd.DataFrame, floor_step: str) -> pd.DataFrame:
    """``layer_drift`` (:func:`drift` rows) beside the ``floor`` row of the same layer and metric at the nearest step.

    ``floor`` has its step in the column ``floor_step``, dropped from the result. Rows come
    in :func:`drift`'s order, layers in its categories.
    """
    categories = layer_drift["layer"].cat.categories
    layer_drift = layer_drift.assign(layer=layer_drift["layer"].astype(str)).sort_values("step")
    floor = floor.assign(layer=floor["layer"].astype(str)).sort_values(floor_step)
    joined = pd.merge_asof(
        layer_drift, floor, left_on="step", right_on=floor_step, by=["layer", "metric"], direction="nearest"
    ).drop(columns=floor_step)
    joined["layer"] = pd.Categorical(joined["layer"], categories=categories)
    return joined.sort_values(["metric", "step", "layer"], ignore_index=True)


def drift_to_noise(
    run: RunLike,
    metric: str | Sequence[str] = "wasserstein",
    reference: str | int = "initial",
    normalize: bool = True,
    agg: str = "mean",
    source: str = "train",
) -> pd.DataFrame:
    """Layer drift next to its noise floor: :func:`drift` plus ``noise`` and ``ratio`` columns.

    ``noise`` is the :func:`noise_floor` of the same layer and metric at the
    nearest probe step; ``ratio = value / noise``. Ratios well above 1 are shift
    that batch-to-batch sampling alone does not explain.
    """
    layer_drift = drift(run, metric, reference, normalize, "layer", agg, source)
    floor = noise_floor(run, metric, normalize, "layer", agg)
    floor = floor[["step", "layer", "metric", "value"]].rename(columns={"value": "noise", "step": "probe_step"})
    joined = beside_floor(layer_drift, floor, "probe_step")
    with np.errstate(divide="ignore", invalid="ignore"):
        joined["ratio"] = joined["value"] / joined["noise"]
    return joined


def drift_table(
    run_a: Run,
    run_b: Run,
    metric: str = "wasserstein",
    reference: str | int = "initial",
    source: str = "train",
    match: str = "name",
    normalize: bool = True,
    agg: str = "mean",
) -> pd.DataFrame:
    """Per-layer side-by-side drift of two runs: mean over training, final, ratios b / a.

    Args:
        run_a: the baseline run (e.g. without BatchNorm).
        run_b: the run compared with it.
        metric: one metric name.
        reference: as in :func:`drift`.
        source: as in :func:`drift`.
        match: ``"name"`` pairs layers with the same name (layers of one run
            only, such as BatchNorm layers, are left out); ``"type"`` pairs the
            k-th layer of each type (the k-th ``Conv2d`` with the k-th ``Conv2d``…),
            for networks whose names differ.
        normalize: as in :func:`drift`.
        agg: as in :func:`drift`.

    Returns:
        One row per matched layer: ``layer_a, layer_b, type, mean_a, mean_b,
        mean_ratio, final_a, final_b, final_ratio, noise_a, noise_b``. ``mean_*``
        is the layer's drift averaged over all recorded steps, ``final_*`` its
        drift at the last one, ``*_ratio`` is b / a (below 1: b drifts less),
        ``noise_*`` the mean noise floor over probe steps (NaN without probes).

    Raises:
        ValueError: an unknown match, or no layer matches.
    """
    if not isinstance(metric, str) or metric == "all":
        raise ValueError(f"drift_table takes one metric name from {names()}, got {metric!r}")
    resolve(metric)
    for name, run in (("run_a", run_a), ("run_b", run_b)):
        if not isinstance(run, Run):
            raise TypeError(f"drift_table needs covshift.Run objects (it matches their layers), got {name}={type(run).__name__}")
    check_choice("match", match, MATCHES)
    pairs = _match_layers(run_a, run_b, match)
    columns = {}
    for suffix, run in (("a", run_a), ("b", run_b)):
        per_layer = drift(run, metric, reference, normalize, "layer", agg, source)
        per_layer = per_layer.sort_values("step")
        grouped = per_layer.groupby(per_layer["layer"].astype(str))["value"]
        columns[f"mean_{suffix}"] = grouped.mean()
        columns[f"final_{suffix}"] = grouped.last()
        columns[f"noise_{suffix}"] = mean_noise(run, metric, normalize, agg)
    rows = []
    for layer_a, layer_b, kind in pairs:
        row = {"layer_a": layer_a, "layer_b": layer_b, "type": kind}
        for name in ("mean", "final", "noise"):
            for suffix, layer in (("a", layer_a), ("b", layer_b)):
                row[f"{name}_{suffix}"] = columns[f"{name}_{suffix}"].get(layer, np.nan)
        rows.append(row)
    table = pd.DataFrame(rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        table["mean_ratio"] = table["mean_b"] / table["mean_a"]
        table["final_ratio"] = table["final_b"] / table["final_a"]
    order = ["layer_a", "layer_b", "type", "mean_a", "mean_b", "mean_ratio",
             "final_a", "final_b", "final_ratio", "noise_a", "noise_b"]
    return table[order]



def _match_layers(run_a: Run, run_b: Run, match: str) -> list[tuple[str, str, str]]:
    la, lb = run_a.layers, run_b.layers
    if match == "name":
        types_b = dict(zip(lb["layer"], lb["type"]))
        pairs = [(name, name, kind) for name, kind in zip(la["layer"], la["type"]) if name in types_b]
    else:
        la, lb = la.assign(k=la.groupby("type").cumcount()), lb.assign(k=lb.groupby("type").cumcount())
        both = la.merge(lb, on=["type", "k"], suffixes=("_a", "_b"), sort=False)
        pairs = list(zip(both["layer_a"], both["layer_b"], both["type"]))
    if not pairs:
        hint = "; try match='type'" if match == "name" else ""
        raise ValueError(
            f"no layer of {run_a.name!r} ({list(la['layer'])}) matches one of "
            f"{run_b.name!r} ({list(lb['layer'])}) by {match}{hint}"
        )
    return pairs


def has_probe(run: Run) -> bool:
    """Whether ``run`` holds records of both probe halves (what :func:`noise_floor` needs)."""
    held = run.sources().index
    return "probe_a" in held and "probe_b" in held


def mean_noise(run: Run, metric: str, normalize: bool, agg: str) -> pd.Series:
    """Each layer's noise floor averaged over probe steps (empty without probes)."""
    if not has_probe(run):
        return pd.Series(dtype=float)
    floor = noise_floor(run, metric, normalize, "layer", agg)
    return floor.groupby(floor["layer"].astype(str))["value"].mean()


