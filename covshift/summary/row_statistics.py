"""Quantiles, bin means and zero fractions of sample rows, in numpy: the CPU's finalize.

In a training step a torch call costs several microseconds whatever its size and
a numpy call on a small array about one, so :func:`covshift.finalize.finalize`
hands CPU samples to these functions, a cache-sized block of rows of one width
at a time. Full rows of 1,024 values take :func:`rank_bins`, which sorts them in
halves (numpy's fast width) and merges just far enough to read every statistic.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from covshift.columns import N_BINS, QUANTILE_LEVELS

#: Sample values finalized together: a block that stays in the CPU cache while
#: it is sorted and read, however many layers a step has.
BLOCK_VALUES = 1 << 18

def blocks(samples: list) -> list[list]:
    """Consecutive runs of samples (tensors or arrays) holding about :data:`BLOCK_VALUES` values each."""
    blocks: list[list] = []
    values = BLOCK_VALUES
    for sample in samples:
        size = sample.shape[0] * sample.shape[1]
        if values + size > BLOCK_VALUES:
            blocks.append([])
            values = 0
        blocks[-1].append(sample)
        values += size
    return blocks


def statistics_by_width(samples: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero fraction (float64), quantiles and bin means (float32, or float64 when a sample is float64) of
    every row of ``samples``, in order.

    Samples of one width are finalized together, a block of :data:`BLOCK_VALUES`
    at a time, so no row is padded: a narrow layer's rows sort as fast as their
    width allows, and full rows take the fast path of :func:`statistics_of_rows`.
    """
    rows = sum(sample.shape[0] for sample in samples)
    zero_frac = np.empty(rows)
    dtype = np.float64 if any(sample.dtype == np.float64 for sample in samples) else np.float32
    quantiles = np.empty((rows, len(QUANTILE_LEVELS)), dtype)
    binmeans = np.empty((rows, N_BINS), dtype)
    starts = np.cumsum([0] + [sample.shape[0] for sample in samples])
    by_width: dict[int, list[int]] = {}
    for i, sample in enumerate(samples):
        by_width.setdefault(sample.shape[1], []).append(i)
    for indices in by_width.values():
        order = iter(indices)
        for block in blocks([samples[i] for i in indices]):
            statistics = statistics_of_rows(np.concatenate(block))
            if len(block) == 1:  # the common case of a layer with its own block, or a step of one width
                start = starts[next(order)]
                zero_frac[start : start + len(statistics[0])], quantiles[start : start + len(statistics[0])], \
                    binmeans[start : start + len(statistics[0])] = statistics
                continue
            done = 0
            for sample in block:
                start, count = starts[next(order)], sample.shape[0]
                for out, values in zip((zero_frac, quantiles, binmeans), statistics):
                    out[start : start + count] = values[done : done + count]
                done += count
    return zero_frac, quantiles, binmeans


def zero_count(rows: np.ndarray) -> np.ndarray:
    """Exact zeros per row (int64) of a 2-D array.

    The comparison's bytes (0 or 1) are summed eight at a time as uint64 words: with at most
    255 words per row no byte carries into the next, so the row's count is the sum of its
    total's eight bytes: 2.6x as fast as a byte sum in int64 (benchmarks/hot_path.py).
    """
    equal = np.equal(rows, 0, order="C")  # rows in C order, whatever the input's layout
    if rows.shape[1] % 8 or rows.shape[1] > 8 * 255:
        return equal.view(np.uint8).sum(1, dtype=np.int64)
    totals = equal.view(np.uint64).sum(1, dtype=np.uint64)
    return totals.view(np.uint8).reshape(-1, 8).sum(1, dtype=np.int64)


def statistics_of_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero fraction (float64), quantiles (linear interpolation) and equal-mass bin means (at the rows'
    precision: :func:`_stored`) of each row's finite values.

    Overwrites ``rows``; the numpy twin of :func:`_zero_fraction` and :func:`_sample_statistics`.
    """
    count, width = rows.shape
    zeros = zero_count(rows)
    if width == 2 * _FAST_SORT:
        bins = rank_bins(rows)
        if np.isfinite(bins[:, -1].max()):  # +inf (non-finite values) would rank last
            return zeros / width, *_statistics_of_bins(bins)
        rows = bins.reshape(count, width)  # each row's values, permuted: sorted below
    sort_rows(rows)  # +inf (non-finite values) sorts last
    levels = np.array(QUANTILE_LEVELS)
    if width % N_BINS == 0 and np.isfinite(rows[:, -1]).all():  # the common case: every row full and finite
        position = levels * (width - 1)
        low = np.floor(position).astype(np.intp)
        high = np.minimum(low + 1, width - 1)
        at_low, at_high = rows[:, low].astype(np.float64), rows[:, high].astype(np.float64)
        quantiles = _interpolated(at_low, at_high, position - low)
        runs = torch.from_numpy(rows).view(count, N_BINS, width // N_BINS)
        binmeans = runs.sum(2, dtype=torch.float64).numpy() / (width // N_BINS)  # torch: see _statistics_of_bins
        return zeros / width, _stored(quantiles, rows.dtype), _stored(binmeans, rows.dtype)
    valid = np.count_nonzero(rows < np.inf, axis=1)[:, None]  # (rows, 1)
    last = np.maximum(valid - 1, 0)
    position = levels[None, :] * last
    low = np.floor(position).astype(np.intp)
    high = np.minimum(low + 1, last)
    at_low = np.take_along_axis(rows, low, 1).astype(np.float64)
    at_high = np.take_along_axis(rows, high, 1).astype(np.float64)
    quantiles = _interpolated(at_low, at_high, position - low)  # rows with no finite value read +inf: NaN below
    edges = np.round(np.arange(N_BINS + 1, dtype=np.float64)[None, :] * valid / N_BINS).astype(np.int64)
    start, stop = edges[:, :-1], edges[:, 1:]
    bin_width = stop - start
    sums = bin_sums(torch.from_numpy(rows), torch.from_numpy(edges)).numpy()
    # A bin is empty only when a channel has fewer values than bins: take its value.
    single = np.take_along_axis(rows, np.minimum(start, last), 1).astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf / n where a bin's sum overflowed (float64 inputs near 1e308)
        binmeans = np.where(bin_width > 0, sums / np.maximum(bin_width, 1), single)
    empty = valid == 0
    quantiles = np.where(empty, np.nan, quantiles)
    binmeans = np.where(empty, np.nan, binmeans)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero_frac = zeros / valid[:, 0]
    return zero_frac, _stored(quantiles, rows.dtype), _stored(binmeans, rows.dtype)


def _interpolated(at_low: np.ndarray, at_high: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    """Linear interpolation between neighbouring ranks, with no numpy warning (under ``-W error`` one would
    stop the recording). Where two float64 values near ±1e308 are further apart than the largest double,
    the weighted sum of the two takes over from the difference, which would overflow to the wrong sign."""
    with np.errstate(invalid="ignore", over="ignore"):
        gap = at_high - at_low
        return np.where(np.isfinite(gap), at_low + fraction * gap, at_low * (1 - fraction) + at_high * fraction)


def bin_sums(ordered: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Per row of ``ordered`` (sorted rows), the float64 sums of the values at positions ``edges[:, k]`` up to
    ``edges[:, k + 1]``, one bin at a time.

    Each bin is summed on its own: a difference of running sums would let one huge value (-1e20, say) cancel
    the bins after it to zero. Positions from ``edges[:, -1]`` on (+inf, no value) are summed apart and dropped.
    Runs wherever ``ordered`` is, with no host sync.
    """
    rows, width = ordered.shape
    positions = torch.arange(width, device=ordered.device).expand(rows, width).contiguous()
    bins = torch.searchsorted(edges[:, 1:].contiguous(), positions, right=True)  # N_BINS from the last edge on
    sums = torch.zeros(rows, N_BINS + 1, dtype=torch.float64, device=ordered.device)
    return sums.scatter_add_(1, bins, ordered.double())[:, :N_BINS]


def _stored(values: np.ndarray, precision: np.dtype) -> np.ndarray:
    """``values`` (float64) at the precision of the samples they come from, as stored: float32 for
    float32 samples (a quantile or bin mean of float32 values lies in float32's range), float64 for
    float64 ones, so a value of ±1e300 is stored as itself, never as ±inf."""
    if precision == np.float64:
        return values
    with np.errstate(over="ignore"):
        return values.astype(np.float32)


def sort_rows(rows: np.ndarray) -> None:
    """Sort each row of ``rows`` ascending, in place."""
    rows.sort(axis=1)


#: Rows of up to this many values sort 3.4x faster per value than rows of 1,024 in numpy on this
#: machine (the reference CNN's 185 sample rows: 0.23 against 0.79 ms, benchmarks/hot_path.py),
#: so rows of twice this width are sorted in halves and merged.
_FAST_SORT = 512


def rank_bins(rows: np.ndarray) -> np.ndarray:
    """``rows`` (each of ``2 * _FAST_SORT`` values) as (rows, N_BINS, width / N_BINS): run k of each row holds
    the values of ranks ``k·width/N_BINS`` up to the next run's, in no particular order.

    Sorts each half of each row (fast at that width), then runs the first five stages of a
    bitonic merge of the two halves: each stage a minimum and a maximum of two half-runs,
    after which every value of a run is at most every value of the next. ``rows`` is overwritten.
    """
    count, width = rows.shape
    half, size = width // 2, width // N_BINS
    rows.reshape(count * 2, half).sort(axis=1)
    x = torch.from_numpy(rows)
    y = torch.empty_like(x)
    low, high = x[:, :half], x[:, half:].flip(1)  # ascending then descending: one bitonic sequence
    torch.minimum(low, high, out=y[:, :half])
    torch.maximum(low, high, out=y[:, half:])
    source, target, run = y, x, half // 2
    while run >= size:
        pairs, out = source.view(count, -1, 2, run), target.view(count, -1, 2, run)
        torch.minimum(pairs[:, :, 0], pairs[:, :, 1], out=out[:, :, 0])
        torch.maximum(pairs[:, :, 0], pairs[:, :, 1], out=out[:, :, 1])
        source, target, run = target, source, run // 2
    return source.numpy().reshape(count, N_BINS, size)


def _statistics_of_bins(bins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantiles and bin means of full finite rows from their rank bins (:func:`rank_bins`), at their precision.

    A quantile reads the values of two neighbouring ranks: the first of a run is its minimum,
    the last its maximum, and the few runs that hold a rank strictly inside are sorted.
    """
    count, _, size = bins.shape
    low, high, fraction, inner = _bin_reads(N_BINS * size)
    runs = torch.from_numpy(bins)  # torch reduces along a short axis some 10x faster than numpy
    extrema = [runs.amin(2).numpy(), runs.amax(2).numpy()]
    table = np.concatenate([*extrema, np.sort(bins[:, inner], axis=2).reshape(count, -1)], axis=1)
    at_low, at_high = table[:, low].astype(np.float64), table[:, high].astype(np.float64)
    quantiles = _interpolated(at_low, at_high, fraction)
    binmeans = runs.sum(2, dtype=torch.float64).numpy() / size
    return _stored(quantiles, bins.dtype), _stored(binmeans, bins.dtype)


@functools.cache
def _bin_reads(width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For full rows of ``width`` values: the columns of each quantile level's lower and upper rank in the
    table of :func:`_statistics_of_bins` (the runs' minima, their maxima, the inner runs sorted), the
    interpolation fractions, and the inner runs."""
    size = width // N_BINS
    position = np.array(QUANTILE_LEVELS) * (width - 1)
    low = np.floor(position).astype(np.intp)
    high = np.minimum(low + 1, width - 1)
    inner = np.unique([rank // size for rank in np.concatenate([low, high]) if 0 < rank % size < size - 1])

    def column(rank: int) -> int:
        run, offset = divmod(int(rank), size)
        if offset == 0:
            return run
        if offset == size - 1:
            return N_BINS + run
        return 2 * N_BINS + int(np.searchsorted(inner, run)) * size + offset

    return (np.array([column(rank) for rank in low]), np.array([column(rank) for rank in high]),
            position - low, inner.astype(np.intp))
