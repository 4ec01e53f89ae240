"""A run's records as arrays for the drift metrics, read a few layers at a time.

:func:`read_arrays` turns ``run.stats()`` rows (or a DataFrame shaped like
them) into sorted arrays; :func:`layer_batches` reads a stored run in batches of
layers of about :data:`BATCH_ROWS` rows, with only the columns the metrics need,
so :func:`covshift.drift` keeps its memory flat however long the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from covshift.checks import check_choice
from covshift.faults import EMPTY_RUN
from covshift.columns import BINMEAN_COLUMNS, QUANTILE_COLUMNS, SOURCES
from covshift.metrics.registry import Metric
from covshift.store.run import Run

#: Records read at a time by :func:`covshift.drift` from a stored run (a few hundred MB with every column).
BATCH_ROWS = 2**20
RunLike = Run | pd.DataFrame
#: Columns of a stats DataFrame that every metric reads (quantiles and bin means are read when needed).
NEEDED_COLUMNS = ("count", "mean", "var", "min", "max")


@dataclass
class RecordArrays:
    """One source's records as arrays, rows sorted by (step, layer, channel)."""

    step: np.ndarray
    layer: np.ndarray  # int codes into the run's layer order
    channel: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    constant: np.ndarray  # zero variance or no finite value
    knots: Columns | None  # quantile-function knots: min, quantiles, max
    binmeans: Columns | None  # the 32 bin means
    sketched: np.ndarray | bool = True  # records with quantiles and bin means (a layer's sketched channels)


def read_arrays(
    run: RunLike, source: str, metrics: tuple[Metric, ...], hint: str = "", order: list[str] | None = None
) -> tuple[RecordArrays, list[str]]:
    """``source``'s records as arrays; quantiles and bin means only when ``metrics`` read them.

    ``order``: the layer order, when ``run`` is a DataFrame of some of a run's layers.
    """
    check_choice("source", source, SOURCES)
    if isinstance(run, Run):
        frame = run.stats(source)
        if frame.empty:
            raise no_records(source, list(run.sources().index), hint)
    elif isinstance(run, pd.DataFrame):
        if "source" not in run and source != "train":
            raise ValueError(f"a stats DataFrame without a 'source' column holds training records only; got source={source!r}")
        frame = run[run["source"] == source] if "source" in run else run
        missing = [c for c in ("step", "layer", "channel", *needed_columns(metrics)) if c not in frame]
        if missing:
            raise ValueError(f"the stats DataFrame lacks the columns {missing}: pass run.stats() or a subset of its rows")
        if frame.empty:
            raise no_records(source, sorted(set(run["source"])), hint)
    else:
        raise TypeError(f"run must be a covshift.Run or a stats DataFrame, got {type(run).__name__}")
    layers, codes = layer_codes(frame["layer"], layer_order(run) if isinstance(run, Run) else order)
    step = frame["step"].to_numpy(np.int64)
    channel = frame["channel"].to_numpy(np.int64)
    order = np.lexsort((channel, codes, step))
    key = np.stack([step[order], codes[order], channel[order]])
    repeated = np.flatnonzero((key[:, 1:] == key[:, :-1]).all(axis=0))
    if len(repeated):
        first = key[:, repeated[0]]
        raise ValueError(
            f"{len(repeated)} records repeat a (step, layer, channel) of source={source!r}, e.g. step {first[0]}, "
            f"layer {layers[first[1]]!r}, channel {first[2]}: were two runs' stats concatenated?"
        )
    if np.all(order[1:] > order[:-1]):
        order = slice(None)
    var = frame["var"].to_numpy(np.float64)[order]
    low, high = frame["min"].to_numpy(np.float64)[order], frame["max"].to_numpy(np.float64)[order]
    count = frame["count"].to_numpy(np.float64)[order]
    perm = None if isinstance(order, slice) else order
    knots = binmeans = None
    sketched: np.ndarray | bool = True
    reads = frozenset().union(*(metric.reads for metric in metrics))
    if reads & {"binmeans", "knots"}:
        mask = frame[QUANTILE_COLUMNS[0]].notna().to_numpy()[order]
        sketched = True if mask.all() else mask  # True: every record, no row selection per chunk
    if "knots" in reads:
        knots = Columns([frame[c].to_numpy() for c in ["min", *QUANTILE_COLUMNS, "max"]], perm)
    if "binmeans" in reads:
        binmeans = Columns([frame[c].to_numpy() for c in BINMEAN_COLUMNS], perm)
    summaries = RecordArrays(
        step=step[order],
        layer=codes[order],
        channel=channel[order],
        mean=frame["mean"].to_numpy(np.float64)[order],
        sd=np.sqrt(var),
        constant=~((count > 0) & (high > low) & (var > 0)),
        knots=knots,
        binmeans=binmeans,
        sketched=sketched,
    )
    return summaries, layers


class Columns:
    """Stored columns (quantiles or bin means) as views, gathered a block of records at a time.

    Gathering per block instead of copying every column up front keeps memory
    flat and the copies cache-sized.
    """

    def __init__(self, columns: list[np.ndarray], perm: np.ndarray | None) -> None:
        self.columns = columns
        self.perm = perm  # sorted position -> frame row, None when the frame is sorted

    def take(self, rows: np.ndarray) -> np.ndarray:
        """``(len(columns), len(rows))`` float32 values of records ``rows``."""
        index = rows if self.perm is None else self.perm[rows]
        out = np.empty((len(self.columns), len(index)), np.float32)
        if len(index) and index[-1] - index[0] == len(index) - 1 and np.all(np.diff(index) == 1):
            index = slice(int(index[0]), int(index[-1]) + 1)
        for row, column in zip(out, self.columns):
            row[:] = column[index]
        return out


def layer_codes(column: pd.Series, order: list[str] | None) -> tuple[list[str], np.ndarray]:
    """Layer names in ``order`` (default: as the column's categories, else sorted) and each row's index."""
    if not isinstance(column.dtype, pd.CategoricalDtype):
        column = column.astype(str).astype("category")
    names = [str(name) for name in column.cat.categories]
    layers = list(order) if order is not None else names
    layers += [name for name in names if name not in layers]
    position = {name: i for i, name in enumerate(layers)}
    remap = np.array([position[name] for name in names] + [-1], dtype=np.int64)
    return layers, remap[column.cat.codes.to_numpy()]


def layer_order(run: RunLike) -> list[str]:
    if isinstance(run, Run):
        return [str(name) for name in run.layers["layer"]]
    layer = run["layer"]
    return [str(c) for c in layer.cat.categories] if isinstance(layer.dtype, pd.CategoricalDtype) else sorted(
        set(layer.astype(str))
    )


def layer_batches(run: Run, source: str, metrics: tuple[Metric, ...]) -> Iterator[pd.DataFrame]:
    """``source``'s records of ``run``, a few layers at a time (about :data:`BATCH_ROWS` rows), with
    only the columns ``metrics`` read: memory stays flat however long the run. Layers without records are skipped;
    a source without records raises ValueError naming the sources there are."""
    check_choice("source", source, SOURCES)
    sources = run.sources()
    if source not in sources.index:
        raise no_records(source, list(sources.index))
    rows_per_channel = int(sources.loc[source, "steps"])  # at most: a layer may miss some steps
    columns = needed_columns(metrics)
    layers = run.layers
    channels = dict(zip(layers["layer"], layers["channels"]))
    pending = list(layers["layer"])
    while pending:
        budget, batch = BATCH_ROWS, []
        while pending[len(batch):] and (not batch or budget >= channels[pending[len(batch)]] * rows_per_channel):
            budget -= channels[pending[len(batch)]] * rows_per_channel
            batch.append(pending[len(batch)])
        pending = pending[len(batch):]
        frame = run.stats(source, layers=batch, columns=columns)
        if not frame.empty:
            yield frame


def needed_columns(metrics: tuple[Metric, ...]) -> list[str]:
    """The stats columns ``metrics`` read: the moments, and quantiles and bin means when needed."""
    reads = frozenset().union(*(metric.reads for metric in metrics))
    columns = [*NEEDED_COLUMNS]
    if "knots" in reads:
        columns += QUANTILE_COLUMNS
    elif "binmeans" in reads:
        columns.append(QUANTILE_COLUMNS[0])  # which records are sketched
    if "binmeans" in reads:
        columns += BINMEAN_COLUMNS
    return columns


def no_records(source: str, present: list[str], hint: str = "") -> ValueError:
    """The error for a source without records, naming the sources the run has (or why it has none)."""
    if not present:
        return ValueError(EMPTY_RUN + (f" ({hint})" if hint else ""))
    return ValueError(
        f"the run has no records of source={source!r}; it has {present or 'no records'}"
        + (f" ({hint})" if hint else "")
    )
