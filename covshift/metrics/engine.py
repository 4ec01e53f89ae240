"""The drift engine: each record paired with its reference, the metrics computed in vectorized chunks,
channels aggregated into tidy rows. The public functions are in :mod:`covshift.metrics.api`."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from covshift.columns import QUANTILE_LEVELS
from covshift.metrics.arrays import Columns, RecordArrays
from covshift.metrics.registry import Metric, Pair

AGGREGATES = ("mean", "median", "max")
BY = ("layer", "channel")
REFERENCE_FORMS = "'initial', 'previous', an int step or 'rolling:K'"
#: Records per vectorized chunk: bounds the temporary memory (about 50 MB per
#: worker thread) and gives every core several chunks.
CHUNK_ROWS = 65536


def parse_reference(reference: str | int) -> tuple[str, int | None]:
    """The reference's label and its number (the step, or the window K).

    >>> parse_reference("rolling:5")
    ('rolling:5', 5)
    """
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
def reference_rows(s: RecordArrays, reference: str | int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rows that have a reference, and the reference rows (K of them for rolling:K)."""
    label, number = parse_reference(reference)
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


def matching_rows(a: RecordArrays, b: RecordArrays) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``a`` and ``b`` with the same (step, layer, channel)."""
    width = int(max(a.channel.max(), b.channel.max())) + 1
    layers = int(max(a.layer.max(), b.layer.max())) + 1
    key_a = (a.step * layers + a.layer) * width + a.channel
    key_b = (b.step * layers + b.layer) * width + b.channel
    _, rows_a, rows_b = np.intersect1d(key_a, key_b, assume_unique=True, return_indices=True)
    return rows_a, rows_b



# -- computing -------------------------------------------------------------------
def compute(
    cur_s: RecordArrays,
    ref_s: RecordArrays,
    cur: np.ndarray,
    refs: list[np.ndarray],
    metrics: tuple[Metric, ...],
    normalize: bool,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each metric for rows ``cur`` of ``cur_s`` against the mean of rows ``refs`` of ``ref_s``.

    Returns the values (NaN where excluded) and, per metric, the mask of rows not
    excluded: channels of zero variance, and for metrics that read quantiles or bin
    means (:attr:`Metric.sketched`) channels outside their layer's sketched subset.
    """
    values = {metric.name: np.full(len(cur), np.nan) for metric in metrics}
    ok = np.zeros(len(cur), dtype=bool)
    levels = np.concatenate([[0.0], QUANTILE_LEVELS, [1.0]]).astype(np.float32)
    requested = frozenset(metric.name for metric in metrics)
    plain = [metric for metric in metrics if not metric.sketched]
    sketched = [metric for metric in metrics if metric.sketched]
    reads = frozenset().union(*(metric.reads for metric in sketched))

    def compute_chunk(lo: int) -> None:
        part = slice(lo, lo + CHUNK_ROWS)
        rows = cur[part]
        ref_rows = [r[part] for r in refs]
        mu_r = _mean_of(ref_s.mean, ref_rows)
        sd_r = _mean_of(ref_s.sd, ref_rows)
        constant_r = _mean_of(ref_s.constant.astype(np.float64), ref_rows) == 1.0
        ok[part] = ~(cur_s.constant[rows] | constant_r)  # constant: zero variance (so sd 0) or no value
        pair = Pair(cur_s.mean[rows], cur_s.sd[rows], mu_r, sd_r, levels=levels, requested=requested)
        for metric in plain:
            values[metric.name][part] = _evaluate(metric, pair, normalize)
        if not sketched:
            return
        # The quantile metrics only where the layer keeps sketches (all rows unless sketch_channels was set).
        keep = slice(None) if np.ndim(cur_s.sketched) == 0 else np.flatnonzero(cur_s.sketched[rows])
        rows, ref_rows = rows[keep], [r[keep] for r in ref_rows]
        pair = Pair(pair.mean[keep], pair.sd[keep], mu_r[keep], sd_r[keep], levels=levels, requested=requested)
        if "binmeans" in reads:
            pair.binmeans, pair.ref_binmeans = cur_s.binmeans.take(rows).T, _mean_of(ref_s.binmeans, ref_rows).T
        if "knots" in reads:
            pair.knots, pair.ref_knots = cur_s.knots.take(rows).T, _mean_of(ref_s.knots, ref_rows).T
        for metric in sketched:
            values[metric.name][part][keep] = _evaluate(metric, pair, normalize)

    _run_chunks(compute_chunk, range(0, len(cur), CHUNK_ROWS))
    in_sketch = np.asarray(cur_s.sketched)[cur] if np.ndim(cur_s.sketched) else True
    oks = {metric.name: ok & in_sketch if metric.sketched else ok for metric in metrics}
    for name, array in values.items():
        array[~oks[name]] = np.nan
    return values, oks


def _evaluate(metric: Metric, pair: Pair, normalize: bool) -> np.ndarray:
    """``metric`` of every row of ``pair``, divided by the reference σ when it is scaled and ``normalize``."""
    with np.errstate(all="ignore"):
        value = np.asarray(metric.compute(pair), dtype=np.float64)
        if value.shape != pair.mean.shape:
            raise ValueError(f"the metric {metric.name!r} returned shape {value.shape} for {len(pair.mean)} "
                             "compared records; it must return one value per record")
        return value / pair.ref_sd if metric.scaled and normalize else value


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
def tidy(
    s: RecordArrays,
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
