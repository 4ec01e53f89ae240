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

    from covshift.summary import Record

#: Columns every stats() frame has, whatever ``columns`` asks for.
KEY_COLUMNS = ("step", "source", "layer", "channel")
_INT_STATS = {"count", "nonfinite"}


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
    wanted = [steps] if isinstance(steps, (int, np.integer)) else list(steps)
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
    of channels outside a layer's sketched subset are null.
    """
    if pending:
        import torch

        keys = [key for step in pending for key in step.keys]
        channels = np.array([key[3] for key in keys])
        stats = torch.cat([step.record.stats for step in pending]).cpu().numpy()
        sketched = np.concatenate([_sketch_mask(step.record) for step in pending])
        quantiles = _spread(torch.cat([step.record.quantiles for step in pending]).cpu().numpy(), sketched)
        binmeans = _spread(torch.cat([step.record.binmeans for step in pending]).cpu().numpy(), sketched)
        step = np.repeat([key[0] for key in keys], channels)
        source = np.repeat([key[1] for key in keys], channels)
        layer = np.repeat([key[2] for key in keys], channels)
        channel = np.concatenate([np.arange(c) for c in channels])
        order = np.lexsort((channel, step, source, layer))
        stats, quantiles, binmeans, sketched = stats[order], quantiles[order], binmeans[order], sketched[order]
        step, source, layer, channel = step[order], source[order], layer[order], channel[order]
    else:
        stats = np.empty((0, len(STAT_NAMES)))
        quantiles = np.empty((0, len(QUANTILE_COLUMNS)), dtype=np.float32)
        binmeans = np.empty((0, len(BINMEAN_COLUMNS)), dtype=np.float32)
        sketched = np.empty(0, dtype=bool)
        step, source, layer, channel = (np.empty(0, dtype=t) for t in (np.int64, str, str, np.int64))
    columns = {
        "step": pa.array(step, pa.int64()),
        "source": pa.array(source, pa.string()).dictionary_encode(),
        "layer": pa.array(layer, pa.string()).dictionary_encode(),
        "channel": pa.array(channel, pa.int32()),
    }
    for i, name in enumerate(STAT_NAMES):
        kind = pa.int64() if name in _INT_STATS else pa.float64()
        columns[name] = pa.array(stats[:, i].astype(kind.to_pandas_dtype()), kind)
    missing = None if sketched.all() else ~sketched
    for i, name in enumerate(QUANTILE_COLUMNS):
        columns[name] = pa.array(quantiles[:, i], pa.float32(), mask=missing)
    for i, name in enumerate(BINMEAN_COLUMNS):
        columns[name] = pa.array(binmeans[:, i], pa.float32(), mask=missing)
    return pa.table(columns)


def _sketch_mask(record: Record) -> np.ndarray:
    """Which of a record's rows hold quantiles and bin means."""
    if record.sketched is None:
        return np.ones(record.stats.shape[0], dtype=bool)
    return record.sketched.numpy()


def _spread(values: np.ndarray, sketched: np.ndarray) -> np.ndarray:
    """The sketched rows' ``values`` placed at their rows of a full-height array (NaN elsewhere)."""
    if sketched.all():
        return values
    full = np.full((sketched.shape[0], values.shape[1]), np.nan, dtype=values.dtype)
    full[sketched] = values
    return full


#: Columns and types of every part.
SCHEMA = records_to_table([]).schema
