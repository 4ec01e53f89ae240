"""`drift()`: drift metrics of a run's per-channel summaries, as tidy DataFrames.

Also the noise floor (:func:`noise_floor`, :func:`drift_to_noise`) and the
side-by-side table of two runs (:func:`drift_table`). The maths lives in
:mod:`covshift.metrics`; this module pairs each record with its reference,
runs the metrics in vectorized chunks and aggregates channels. Definitions,
accuracy and conventions: ``docs/metrics.md``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from covshift import metrics as m
from covshift.checks import check_choice
from covshift.columns import QUANTILE_LEVELS
from covshift.metrics import METRICS, SKETCH_METRICS
from covshift.run import Run
from covshift.summaries import Columns, RunLike, Summaries, layer_batches, layer_order, read_summaries

AGGREGATES = ("mean", "median", "max")
BY = ("layer", "channel")
MATCHES = ("name", "type")
REFERENCE_FORMS = "'initial', 'previous', an int step or 'rolling:K'"
#: Records per vectorized chunk: bounds the temporary memory (about 50 MB per
#: worker thread) and gives every core several chunks.
CHUNK_ROWS = 65536



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
        metric: a name from :data:`METRICS`, a list of them, or ``"all"``.
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
    names = _metric_names(metric)
    label, _ = _parse_reference(reference)
    check_choice("by", by, BY)
    check_choice("agg", agg, AGGREGATES)
    if not isinstance(run, Run):
        return _drift_of(read_summaries(run, source, names), names, reference, normalize, label, by, agg)
    parts = [
        _drift_of(read_summaries(frame, source, names, order=layer_order(run)), names, reference, normalize, label, by, agg)
        for frame in layer_batches(run, source, names)
    ]
    frame = pd.concat(parts, ignore_index=True)
    keys = [frame["channel"].to_numpy()] if by == "channel" else []
    rank = frame["metric"].map({name: i for i, name in enumerate(names)}).to_numpy()
    rows = np.lexsort((*keys, frame["layer"].cat.codes.to_numpy(), frame["step"].to_numpy(), rank))
    return frame.take(rows).reset_index(drop=True)


def _drift_of(
    found: tuple[Summaries, list[str]],
    names: tuple[str, ...],
    reference: str | int,
    normalize: bool,
    label: str,
    by: str,
    agg: str,
) -> pd.DataFrame:
    """:func:`drift` of summaries already read."""
    summaries, layers = found
    cur, refs = _reference_rows(summaries, reference)
    order = np.argsort(cur, kind="stable")  # records in stored order: contiguous blocks
    cur, refs = cur[order], [r[order] for r in refs]
    values, ok = _compute(summaries, summaries, cur, refs, names, normalize)
    return _tidy(summaries, layers, cur, values, ok, label, by, agg)


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
    names = _metric_names(metric)
    check_choice("by", by, BY)
    check_choice("agg", agg, AGGREGATES)
    hint = "record a probe with tracker.probe(batch)"
    half_a, layers = read_summaries(run, "probe_a", names, hint)
    half_b, _ = read_summaries(run, "probe_b", names, hint)
    cur, ref = _matching_rows(half_a, half_b)
    values, ok = _compute(half_a, half_b, cur, [ref], names, normalize)
    return _tidy(half_a, layers, cur, values, ok, "probe halves", by, agg)


def _join_nearest_step(layer_drift: pd.DataFrame, floor: pd.DataFrame, floor_step: str) -> pd.DataFrame:
    """``layer_drift`` beside the ``floor`` row of the same layer and metric at the nearest step.

    ``floor`` has its step in the column ``floor_step``, dropped from the result; layers come out as strings.
    """
    layer_drift = layer_drift.assign(layer=layer_drift["layer"].astype(str)).sort_values("step")
    floor = floor.assign(layer=floor["layer"].astype(str)).sort_values(floor_step)
    return pd.merge_asof(
        layer_drift, floor, left_on="step", right_on=floor_step, by=["layer", "metric"], direction="nearest"
    ).drop(columns=floor_step)


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
    joined = _join_nearest_step(layer_drift, floor, "probe_step")
    with np.errstate(divide="ignore", invalid="ignore"):
        joined["ratio"] = joined["value"] / joined["noise"]
    joined["layer"] = pd.Categorical(joined["layer"], categories=layer_order(run))
    return joined.sort_values(["metric", "step", "layer"], ignore_index=True)


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
        raise ValueError(f"drift_table takes one metric name from {METRICS}, got {metric!r}")
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
        columns[f"noise_{suffix}"] = _mean_noise(run, metric, normalize, agg)
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


def _metric_names(metric: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(metric, str):
        names = METRICS if metric == "all" else (metric,)
    else:
        names = tuple(metric) if isinstance(metric, Sequence) else ()
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(f"metric must be 'all' or names from {METRICS}, got {metric!r}")
    return tuple(dict.fromkeys(names))


def _parse_reference(reference: str | int) -> tuple[str, int | None]:
    """The reference's label and its number (the step, or the window K)."""
    if isinstance(reference, (int, np.integer)) and not isinstance(reference, bool):
        return f"step:{int(reference)}", int(reference)
    if reference in ("initial", "previous"):
        return str(reference), None
    if isinstance(reference, str) and reference.startswith("rolling:"):
        window = reference.split(":", 1)[1]
        if window.isdigit() and int(window) >= 1:
            return f"rolling:{int(window)}", int(window)
    raise ValueError(f"reference must be {REFERENCE_FORMS}, got {reference!r}")


# -- pairing ---------------------------------------------------------------------
def _reference_rows(s: Summaries, reference: str | int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rows that have a reference, and the reference rows (K of them for rolling:K)."""
    label, number = _parse_reference(reference)
    channel_key = s.layer * (int(s.channel.max()) + 1) + s.channel
    by_channel = np.lexsort((s.step, channel_key))  # each channel's records in step order
    key = channel_key[by_channel]
    first = np.r_[True, key[1:] != key[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(len(key)), 0))
    position = np.arange(len(key)) - start  # index of the record within its channel
    if label == "initial":
        return by_channel, [by_channel[start]]
    if label == "previous" or label.startswith("rolling:"):
        window = 1 if label == "previous" else number
        keep = position >= window
        refs = [by_channel[np.flatnonzero(keep) - lag] for lag in range(1, window + 1)]
        return by_channel[keep], refs
    at_step = s.step[by_channel] == number
    if not at_step.any():
        steps = np.unique(s.step)
        raise ValueError(
            f"reference step {number} was not recorded; recorded steps run {steps[0]}..{steps[-1]} "
            f"({len(steps)} steps), e.g. {steps[: min(5, len(steps))].tolist()}"
        )
    starts = np.flatnonzero(first)
    found = np.maximum.reduceat(np.where(at_step, np.arange(len(key)), -1), starts)
    found = np.repeat(found, np.diff(np.r_[starts, len(key)]))
    keep = found >= 0
    return by_channel[keep], [by_channel[found[keep]]]


def _matching_rows(a: Summaries, b: Summaries) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``a`` and ``b`` with the same (step, layer, channel)."""
    width = int(max(a.channel.max(), b.channel.max())) + 1
    layers = int(max(a.layer.max(), b.layer.max())) + 1
    key_a = (a.step * layers + a.layer) * width + a.channel
    key_b = (b.step * layers + b.layer) * width + b.channel
    _, rows_a, rows_b = np.intersect1d(key_a, key_b, assume_unique=True, return_indices=True)
    return rows_a, rows_b


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


def _mean_noise(run: Run, metric: str, normalize: bool, agg: str) -> pd.Series:
    """Each layer's noise floor averaged over probe steps (empty without probes)."""
    if not has_probe(run):
        return pd.Series(dtype=float)
    floor = noise_floor(run, metric, normalize, "layer", agg)
    return floor.groupby(floor["layer"].astype(str))["value"].mean()


# -- computing -------------------------------------------------------------------
def _compute(
    cur_s: Summaries,
    ref_s: Summaries,
    cur: np.ndarray,
    refs: list[np.ndarray],
    names: tuple[str, ...],
    normalize: bool,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each metric for rows ``cur`` of ``cur_s`` against the mean of rows ``refs`` of ``ref_s``.

    Returns the values (NaN where excluded) and, per metric, the mask of rows not
    excluded: channels of zero variance, and for :data:`SKETCH_METRICS` channels
    outside their layer's sketched subset.
    """
    values = {name: np.full(len(cur), np.nan) for name in names}
    ok = np.zeros(len(cur), dtype=bool)
    levels = np.concatenate([[0.0], QUANTILE_LEVELS, [1.0]]).astype(np.float32)
    cdf_names = [name for name in names if name in m.CDF_METRICS]

    def compute_chunk(lo: int) -> None:
        part = slice(lo, lo + CHUNK_ROWS)
        rows = cur[part]
        ref_rows = [r[part] for r in refs]
        mu_r = _mean_of(ref_s.mean, ref_rows)
        sd_r = _mean_of(ref_s.sd, ref_rows)
        constant_r = _mean_of(ref_s.constant.astype(np.float64), ref_rows) == 1.0
        good = ~(cur_s.constant[rows] | constant_r)  # constant: zero variance (so sd 0) or no value
        ok[part] = good
        mu_t, sd_t = cur_s.mean[rows], cur_s.sd[rows]
        scale = sd_r if normalize else None
        with np.errstate(all="ignore"):
            if "mean_shift" in names:
                values["mean_shift"][part] = m.mean_shift(mu_t, mu_r, scale)
            if "std_ratio" in names:
                values["std_ratio"][part] = m.std_ratio(sd_t, sd_r)
            if "gaussian_w2" in names:
                values["gaussian_w2"][part] = m.gaussian_w2(mu_t, sd_t, mu_r, sd_r, normalize)
        if not ("wasserstein" in names or cdf_names):
            return
        # The quantile metrics only where the layer keeps sketches (all rows unless sketch_channels was set).
        keep = slice(None) if np.ndim(cur_s.sketched) == 0 else np.flatnonzero(cur_s.sketched[rows])
        rows, ref_rows = rows[keep], [r[keep] for r in ref_rows]
        if "wasserstein" in names:
            with np.errstate(all="ignore"):
                values["wasserstein"][part][keep] = m.wasserstein(
                    cur_s.binmeans.take(rows).T, _mean_of(ref_s.binmeans, ref_rows).T,
                    None if scale is None else scale[keep],
                )
        if cdf_names:
            found = m.cdf_metrics(cur_s.knots.take(rows).T, _mean_of(ref_s.knots, ref_rows).T, levels, cdf_names)
            for name, result in found.items():
                values[name][part][keep] = result

    _run_chunks(compute_chunk, range(0, len(cur), CHUNK_ROWS))
    sketched = np.asarray(cur_s.sketched)[cur] if np.ndim(cur_s.sketched) else True
    oks = {name: ok & sketched if name in SKETCH_METRICS else ok for name in names}
    for name, array in values.items():
        array[~oks[name]] = np.nan
    return values, oks


def _run_chunks(work: Callable[[int], None], starts: range) -> None:
    """``work(start)`` for every chunk, on one thread per CPU core (numpy releases the GIL)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(cores, len(starts))
    if workers <= 1:
        for start in starts:
            work(start)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(work, starts))  # re-raises the first error


def _mean_of(array: np.ndarray | Columns, rows: list[np.ndarray]) -> np.ndarray:
    """The values of records ``rows[0]``, or their mean over several sets of records (a rolling window)."""
    take = array.take if isinstance(array, Columns) else array.__getitem__
    if len(rows) == 1:
        return take(rows[0])
    total = take(rows[0]).astype(np.float64)
    for r in rows[1:]:
        total += take(r)
    return (total / len(rows)).astype(np.float32 if isinstance(array, Columns) else array.dtype)


# -- output ----------------------------------------------------------------------
def _tidy(
    s: Summaries,
    layers: list[str],
    cur: np.ndarray,
    values: dict[str, np.ndarray],
    oks: dict[str, np.ndarray],
    label: str,
    by: str,
    agg: str,
) -> pd.DataFrame:
    """Rows in (metric, step, layer[, channel]) order, channels aggregated when ``by="layer"``."""
    order = np.argsort(cur, kind="stable")  # back to (step, layer, channel) order
    rows = cur[order]
    step, layer = s.step[rows], s.layer[rows]
    if by == "channel":
        base = {"step": step, "layer": layer, "channel": s.channel[rows]}
    else:
        new_group = np.r_[True, (step[1:] != step[:-1]) | (layer[1:] != layer[:-1])][: len(rows)]
        starts = np.flatnonzero(new_group)
        sizes = np.diff(np.r_[starts, len(rows)])
        base = {"step": step[starts], "layer": layer[starts]}
    frames = []
    for name, value in values.items():
        frame = dict(base)
        frame["layer"] = pd.Categorical.from_codes(base["layer"], categories=layers)
        if by == "channel":
            frame.update(metric=name, reference=label, value=value[order])
        else:
            ok = oks[name][order]
            used = np.add.reduceat(ok.astype(np.int64), starts) if len(rows) else np.zeros(0, np.int64)
            aggregated = _aggregate(value[order], ok, starts, used, agg)
            frame.update(metric=name, reference=label, value=aggregated, channels=used, excluded=sizes - used)
        frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True)


def _aggregate(values: np.ndarray, ok: np.ndarray, starts: np.ndarray, used: np.ndarray, agg: str) -> np.ndarray:
    """``agg`` of the non-excluded values of each contiguous group; NaN where none is left."""
    if len(values) == 0:
        return np.zeros(0)
    if agg == "mean":
        total = np.add.reduceat(np.where(ok, values, 0.0), starts)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(used > 0, total / np.maximum(used, 1), np.nan)
    if agg == "max":
        return np.fmax.reduceat(np.where(ok, values, np.nan), starts)
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(values)]))
    return pd.Series(np.where(ok, values, np.nan)).groupby(group).median().to_numpy()
