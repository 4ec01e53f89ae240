"""A run's records as an Arrow table: the stored schema, the sketched subset, read filters.

The one place that knows how finalized steps become Parquet rows and how a
``stats()`` filter becomes a Parquet predicate. Needs no torch unless it converts
finalized records (recording imports it there).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from covshift.columns import BINMEAN_COLUMNS, QUANTILE_COLUMNS, STAT_NAMES

if TYPE_CHECKING:
    import torch

    from covshift.summary.summarize import Record

#: Columns every stats() frame has, whatever ``columns`` asks for.
KEY_COLUMNS = ("step", "source", "layer", "channel")
_INT_STATS = {"count", "nonfinite"}
_NAMES = pa.dictionary(pa.int32(), pa.string())


def _schema(sketches: pa.DataType) -> pa.Schema:
    return pa.schema(
        [
            ("step", pa.int64()), ("source", _NAMES), ("layer", _NAMES), ("channel", pa.int32()),
            *((name, pa.int64() if name in _INT_STATS else pa.float64()) for name in STAT_NAMES),
            *((name, sketches) for name in (*QUANTILE_COLUMNS, *BINMEAN_COLUMNS)),
        ]
    )


#: Columns and types of every part: quantiles and bin means in float32, the precision of float32 inputs.
SCHEMA = _schema(pa.float32())
#: The columns of a part holding float64 inputs' records: quantiles and bin means in float64 (format 4).
SCHEMA_FLOAT64 = _schema(pa.float64())
#: The schemas a part may have; a read of parts of both holds float64 quantiles and bin means.
SCHEMAS = (SCHEMA, SCHEMA_FLOAT64)


class PendingStep(NamedTuple):
    """A finalized step waiting to be written: ``seq`` numbers the run's steps from 0."""

    seq: int
    keys: list[tuple[int, str, str, int]]
    record: Record
    nbytes: int


def steps_filter(steps: int | Iterable[int]) -> pc.Expression:
    """A Parquet filter keeping ``steps``: a range of step 1 as bounds (row groups skipped by their statistics)."""
    step = pc.field("step")
    if isinstance(steps, range) and steps.step == 1:
        return (step >= steps.start) & (step < steps.stop)
    wanted = [steps] if isinstance(steps, (int, np.integer)) or not isinstance(steps, Iterable) else list(steps)
    if not all(isinstance(value, (int, np.integer)) and not isinstance(value, bool) for value in wanted):
        raise TypeError(f"steps must be an int or an iterable of ints, got {steps!r}")
    return step.isin([int(value) for value in wanted])


def checked_columns(columns: Sequence[str]) -> list[str]:
    """The key columns and ``columns``, in stored order; an unknown column raises ValueError."""
    names = [columns] if isinstance(columns, str) else list(columns)
    unknown = [name for name in names if name not in SCHEMA.names]
    if unknown:
        raise ValueError(f"no column {', '.join(map(repr, unknown))}; columns: {', '.join(SCHEMA.names)}")
    return [name for name in SCHEMA.names if name in KEY_COLUMNS or name in names]


def sketch_rows(channels: int, limit: int | None) -> torch.Tensor | None:
    """``limit`` evenly spaced channels of ``channels`` (first and last included); None when all are kept."""
    if limit is None or channels <= limit:
        return None
    import torch

    return torch.linspace(0, channels - 1, limit, dtype=torch.float64).round().long().unique()


def records_to_table(pending: list[PendingStep]) -> pa.Table:
    """Columns of the buffered records, sorted by layer, source, step and channel.

    One device-to-host copy per kind of statistic; the quantiles and bin means
    of channels outside a layer's sketched subset are null. Rows are ordered by
    integer codes of the names (their ranks in sorted order, so the order is the
    names'), the name columns are dictionaries of those codes, and each sketch
    column is gathered straight from the sketched rows with one validity bitmap
    shared by all: strings per row and full-height copies of the sketches took
    most of a flush before (docs/performance.md, "Recording speed").
    """
    if not pending:
        return SCHEMA.empty_table()
    import torch

    keys = [key for step in pending for key in step.keys]
    channels = np.array([key[3] for key in keys])
    steps = np.array([key[0] for key in keys])
    sources, source = _codes([key[1] for key in keys])
    layers, layer = _codes([key[2] for key in keys])
    # A record's rows are consecutive, by channel: sorting the records orders the rows,
    # but where two records share a key (a step number repeated), whose rows interleave.
    records = np.lexsort((steps, source, layer))
    keys_sorted = np.stack([layer, source, steps])[:, records]
    if (np.diff(keys_sorted, axis=1) != 0).any(axis=0).all():
        order = np.repeat((np.cumsum(channels) - channels)[records], channels[records]) + _ranges(channels[records])
    else:
        rows = [np.repeat(key, channels) for key in (steps, source, layer)]
        order = np.lexsort((_ranges(channels), *rows))
    step, source, layer = (np.repeat(key, channels)[order] for key in (steps, source, layer))
    channel = _ranges(channels)[order]
    sketched = np.concatenate([_sketch_mask(p.record) for p in pending])
    # Each output row's row among the sketched ones (0 for the others, which are null).
    among = np.where(sketched, np.cumsum(sketched) - 1, 0)[order]
    quantiles = torch.cat([p.record.quantiles for p in pending]).cpu().numpy()  # float64 if any input was
    binmeans = torch.cat([p.record.binmeans for p in pending]).cpu().numpy()
    return _table(
        step, source, layer, channel, sources, layers,
        torch.cat([p.record.stats for p in pending]).cpu().numpy()[order],
        _gathered(quantiles, among),
        _gathered(binmeans, among),
        sketched[order],
    )


def _table(
    step: np.ndarray, source: np.ndarray, layer: np.ndarray, channel: np.ndarray, sources: list[str],
    layers: list[str], stats: np.ndarray, quantiles: np.ndarray, binmeans: np.ndarray, valid: np.ndarray,
) -> pa.Table:
    """The stored table of rows already in order: sketch columns given as (column, row), null where not ``valid``."""
    columns = {
        "step": pa.array(step, pa.int64()),
        "source": pa.DictionaryArray.from_arrays(pa.array(source, pa.int32()), pa.array(sources, pa.string())),
        "layer": pa.DictionaryArray.from_arrays(pa.array(layer, pa.int32()), pa.array(layers, pa.string())),
        "channel": pa.array(channel, pa.int32()),
    }
    for i, name in enumerate(STAT_NAMES):
        kind = SCHEMA.field(name).type
        columns[name] = pa.array(stats[:, i].astype(kind.to_pandas_dtype()), kind)
    nulls = int(valid.size - np.count_nonzero(valid))
    validity = pa.array(valid).buffers()[1] if nulls else None
    wide = quantiles.dtype == np.float64 or binmeans.dtype == np.float64
    kind = pa.float64() if wide else pa.float32()
    for names, values in ((QUANTILE_COLUMNS, quantiles), (BINMEAN_COLUMNS, binmeans)):
        values = values.astype(kind.to_pandas_dtype(), copy=False)
        for name, column in zip(names, values):
            columns[name] = pa.Array.from_buffers(kind, len(column), [validity, pa.py_buffer(column)], nulls)
    return pa.table(columns, schema=SCHEMA_FLOAT64 if wide else SCHEMA)


def _gathered(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``values[rows]`` as (column, row), each column contiguous (zeros where there are no rows to read)."""
    if not len(values):
        return np.zeros((values.shape[1], len(rows)), values.dtype)
    return np.take(np.ascontiguousarray(values.T), rows, axis=1)


def _codes(names: list[str]) -> tuple[list[str], np.ndarray]:
    """The distinct ``names`` in sorted order, and each name's rank among them (int32)."""
    distinct = sorted(set(names))
    rank = {name: i for i, name in enumerate(distinct)}
    return distinct, np.array([rank[name] for name in names], dtype=np.int32)


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """``0 … n-1`` for each ``n`` of ``lengths``, concatenated."""
    return np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _sketch_mask(record: Record) -> np.ndarray:
    """Which of a record's rows hold quantiles and bin means."""
    if record.sketched is None:
        return np.ones(record.stats.shape[0], dtype=bool)
    return record.sketched.numpy()
