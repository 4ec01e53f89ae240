"""Per-channel summaries of one tensor: the hot path of every hook.

A hook reduces a layer's input to a :class:`Partial` (sums, extrema, counts and
a small value sample per channel) without leaving the tensor's device and
without any host synchronisation. Partials from several calls in one step merge
exactly (:func:`merge`); :func:`finalize` turns them into the stored statistics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from covshift.checks import check_int
from covshift.columns import BINMEAN_COLUMNS, N_BINS, QUANTILE_COLUMNS, QUANTILE_LEVELS, STAT_NAMES  # noqa: F401 - re-exported

#: Values per channel per record the quantiles are taken from (see docs/metrics.md
#: for the sampling error this implies).
DEFAULT_SAMPLE_SIZE = 1024
#: Seed of the stratified sample positions: fixed, so runs sample the same positions.
SAMPLE_SEED = 0


@dataclass
class Partial:
    """Mergeable per-channel state of one or more tensors; every field has C rows.

    Moments are kept as count, mean and the sum of squared deviations from the
    mean (``m2``), in float64: merging them (Chan's pairwise rule) is exact, and
    no large mean can cancel a small spread the way raw sums of squares do.
    """

    count: torch.Tensor  # finite values, int64
    mean: torch.Tensor  # mean of the finite values (0 where there are none), float64
    m2: torch.Tensor  # sum of squared deviations of the finite values from their mean, float64
    min: torch.Tensor
    max: torch.Tensor
    nonfinite: torch.Tensor  # int64
    sample: torch.Tensor  # (C, S) in the input's precision, non-finite values replaced by +inf


@dataclass
class Record:
    """Final statistics, one row per channel of each partial finalized together."""

    stats: torch.Tensor  # (rows, len(STAT_NAMES)) float64
    quantiles: torch.Tensor  # (sketched rows, len(QUANTILE_LEVELS)) float32
    binmeans: torch.Tensor  # (sketched rows, N_BINS) float32
    sketched: torch.Tensor | None = None  # (rows,) bool: the rows with quantiles and bin means; None: all


class Summarizer:
    """Reduces tensors to :class:`Partial` along a channel axis.

    Holds the cache of sample positions, so one summarizer per tracker keeps
    state out of module scope. The sample takes the same positions in every
    record of a given shape: a fixed batch shows no sampling jitter.

    Args:
        sample_size: values per channel the quantiles come from; at or above the
            number of values per channel the sample is the whole channel (exact).
    """

    def __init__(self, sample_size: int = DEFAULT_SAMPLE_SIZE) -> None:
        check_int("sample_size", sample_size)
        self.sample_size = sample_size
        self._positions: dict[tuple, torch.Tensor] = {}
        self._count_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def summarize(self, x: torch.Tensor, channel_dim: int | None) -> Partial | None:
        """Summarize ``x`` per slice along ``channel_dim`` (None: the whole tensor).

        Returns None for an empty tensor: a call with no values is no record.
        float64 inputs keep their precision; other dtypes are summarized in float32.
        """
        x = x.detach()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        if x.numel() == 0:
            return None
        view = _channel_view(x, channel_dim)
        if x.device.type == "cpu":
            # On the CPU a check costs nothing: sums first, the two-pass path only
            # where they hold NaN, Inf or an overflow.
            partial = self._summarize_one_pass(view)
            if partial is not None:
                return partial
        # Off the CPU a check would cost a host sync, so the two-pass path always runs there.
        return self._summarize_two_pass(view)

    def _summarize_one_pass(self, view: torch.Tensor) -> Partial | None:
        """Moments of finite values from sums, shifted by the mean where plain sums would cancel (CPU only).

        ``m2 = Σx² − (Σx)²/n`` loses about ``Σx²/m2`` ulps to cancellation: it is
        kept where that factor is at most :data:`_CANCELLATION_LIMIT` (in float32,
        a relative variance error below about 1e-4), as for ordinary activations.
        Past it (a large mean next to a small spread, a constant) the sums are
        taken again around the mean: one more pass, no cancellation. None where a
        square overflows: the two-pass path scales first.

        One check decides the common case: NaN or Inf anywhere makes ``Σx²``
        non-finite, and a finite ``Σx²`` bounds ``|Σx|``, so a finite ``Σx²`` with
        little cancellation is all the one-pass moments need.

        Every call here costs several microseconds inside a training step (about
        ten times what the same call costs in a tight loop: the step's kernels
        have evicted the interpreter and the dispatcher from the caches), so the
        common case takes as few as it can: four passes over the activations,
        each reduced along one axis and then across the other, the moments in
        float64, one check (docs/performance.md, "Recording speed").
        """
        before, channels, after = view.shape
        n = before * after
        # The first pass's axis (see _reduce); the norm always runs along the contiguous axis.
        dim = 2 if after >= _LONG_ROW else 0
        rest = 0 if dim == 2 else 1
        total = view.sum(dim).sum(rest, dtype=torch.float64)
        total_sq = torch.linalg.vector_norm(view, dim=2).square_().sum(0, dtype=torch.float64)
        mean = total / n
        m2 = torch.addcmul(total_sq, total, mean, value=-1.0)
        # m2 >= Σx² / limit, and false for NaN (a NaN or Inf value) and inf - inf (an overflow).
        if not float(torch.sub(m2, total_sq, alpha=1 / _CANCELLATION_LIMIT[view.dtype]).min()) >= 0:
            if not bool(torch.isfinite(total_sq).all()):
                return None
            pilot = mean.to(view.dtype)
            centred = view - pilot.view(1, -1, 1)
            s1 = _reduce(centred, torch.sum).double()
            s2 = _sum_of_squares(centred).double()
            if not bool(torch.isfinite(s2).all()):
                return None
            mean = pilot.double() + s1 / n
            m2 = (s2 - s1 * s1 / n).clamp_min(0.0)
        count, nonfinite = self._counts(channels, n)
        return Partial(
            count=count,
            mean=mean,
            m2=m2,
            min=view.amin(dim).amin(rest),
            max=view.amax(dim).amax(rest),
            nonfinite=nonfinite,
            sample=self._sample(view),
        )

    def _counts(self, channels: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(channels,)`` int64 tensors of ``n`` and of 0, made once per shape (partials never change them)."""
        key = (channels, n)
        counts = self._count_cache.get(key)
        if counts is None:
            if len(self._count_cache) > 64:  # e.g. many sequence lengths: start afresh
                self._count_cache.clear()
            counts = self._count_cache[key] = (torch.full((channels,), n), torch.zeros(channels, dtype=torch.int64))
        return counts

    def _summarize_two_pass(self, view: torch.Tensor) -> Partial:
        """Moments of the finite values by scaled, centred sums: exact for any finite input.

        Values are divided by a power of two at least half the channel's largest
        magnitude (exact, and no sum or square can overflow), then summed once for
        the mean and once more around it, as in the textbook two-pass algorithm.
        """
        channels = view.shape[1]
        finite = torch.isfinite(view)
        count = _reduce(finite, torch.sum)  # bool sums count, as int64
        seen = count > 0
        # Python scalars, not device tensors: building one on a GPU would wait for it.
        low = _reduce(torch.where(finite, view, float("inf")), torch.amin)
        high = _reduce(torch.where(finite, view, float("-inf")), torch.amax)
        largest = torch.where(seen, torch.maximum(low.abs(), high.abs()), 0.0)
        _, exponent = torch.frexp(largest)  # largest = m · 2^exponent, 0.5 <= m < 1
        scale = torch.ldexp(torch.ones_like(largest), exponent - 1)  # largest / scale in [1, 2)
        scaled = torch.where(finite, view / scale.view(1, channels, 1), 0.0)
        acc = _accumulator(view.device)
        n = count.clamp_min(1).to(acc)
        pilot = (_reduce(scaled, torch.sum).to(acc) / n).to(view.dtype)
        centred = torch.where(finite, scaled - pilot.view(1, channels, 1), 0.0)
        s1 = _reduce(centred, torch.sum).to(acc)
        s2 = _sum_of_squares(centred).to(acc)
        scale = scale.to(acc)
        mean = (pilot.to(acc) + s1 / n) * scale
        m2 = (s2 - s1 * s1 / n).clamp_min(0.0) * scale * scale
        sample = self._sample(view)
        return Partial(
            count=count,
            mean=torch.where(seen, mean, 0.0),
            m2=torch.where(seen, m2, 0.0),
            min=torch.where(seen, low, float("nan")),
            max=torch.where(seen, high, float("nan")),
            nonfinite=view.shape[0] * view.shape[2] - count,
            sample=torch.where(torch.isfinite(sample), sample, float("inf")),
        )

    def _sample(self, view: torch.Tensor) -> torch.Tensor:
        """(C, S) values per channel at fixed stratified positions; all values if few."""
        before, channels, after = view.shape
        if before * after <= self.sample_size:
            # Always a copy: the sample waits for the step to end, and the model may
            # change its activations in place before then.
            sample = view.new_empty(channels, before * after)
            sample.view(channels, before, after).copy_(view.transpose(0, 1))
            return sample
        key = (tuple(view.shape), view.device)
        index = self._positions.get(key)
        if index is None:
            if len(self._positions) > 64:  # e.g. many sequence lengths: start afresh
                self._positions.clear()
            index = self._stratified_index(before, channels, after).to(view.device)
            self._positions[key] = index
        return torch.take(view, index)

    def _stratified_index(self, before: int, channels: int, after: int) -> torch.Tensor:
        """Flat indices (C, S) into a (before, C, after) tensor: one random position per stratum.

        Random within S equal strata avoids the aliasing a plain stride has with
        image widths; a fixed seed keeps the positions identical from record to record.
        """
        s = self.sample_size
        generator = torch.Generator().manual_seed(SAMPLE_SEED)
        jitter = torch.rand(s, generator=generator, dtype=torch.float64)
        positions = ((torch.arange(s, dtype=torch.float64) + jitter) * (before * after / s)).long()
        offsets = (positions // after) * (channels * after) + positions % after
        return torch.arange(channels)[:, None] * after + offsets[None, :]


#: Largest ``Σx²/m2`` (1 + mean²/variance) the plain one-pass moments accept, per
#: input dtype (see :meth:`Summarizer._summarize_one_pass`; float64 carries 29 more
#: bits). Post-ReLU activations reach 20-30; a mean 10 sd from zero gives 101.
_CANCELLATION_LIMIT = {torch.float32: 100.0, torch.float64: 1e9}


def _accumulator(device: torch.device) -> torch.dtype:
    """float64 for per-channel moments, where the device has it (Apple's MPS does not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _channel_view(x: torch.Tensor, channel_dim: int | None) -> torch.Tensor:
    """``x`` as (before, C, after): a view when ``x`` is contiguous, so no value is copied."""
    if channel_dim is None:
        return x.reshape(1, 1, -1)
    channel_dim = channel_dim % x.ndim
    before = math.prod(x.shape[:channel_dim])
    return x.reshape(before, x.shape[channel_dim], -1)


#: Rows at least this long are reduced along the contiguous axis first; shorter
#: ones across the batch first (measured by benchmarks/hot_path.py: each order
#: wins by up to 2.5x on its side of this length).
_LONG_ROW = 256


def _reduce(view: torch.Tensor, op) -> torch.Tensor:
    """Reduce a (before, C, after) tensor to (C,) in the faster order for its shape."""
    if view.shape[2] >= _LONG_ROW:
        return op(op(view, 2), 0)
    return op(op(view, 0), 1)


def _sum_of_squares(view: torch.Tensor) -> torch.Tensor:
    """Per-channel sum of squares of a (before, C, after) tensor, without a squared copy of it."""
    return torch.linalg.vector_norm(view, dim=2).square_().sum(0)


def merge(partials: list[Partial]) -> Partial:
    """Combine partials of the same channels (e.g. a weight-shared layer called twice).

    Counts and extrema merge exactly, means and ``m2`` by Chan's pairwise rule;
    the samples are pooled (each call contributes its own sample, so calls weigh
    equally in the quantiles).
    """
    if len(partials) == 1:
        return partials[0]
    counts = torch.stack([p.count for p in partials])
    n = counts.sum(0)
    weights = counts.to(partials[0].mean.dtype) / n.clamp_min(1)
    means = torch.stack([p.mean for p in partials])
    mean = (weights * means).sum(0)
    spread = (counts * (means - mean).square()).sum(0)
    return Partial(
        count=n,
        mean=mean,
        m2=torch.stack([p.m2 for p in partials]).sum(0) + spread,
        min=functools.reduce(torch.fmin, [p.min for p in partials]),  # fmin: a channel with no value is NaN
        max=functools.reduce(torch.fmax, [p.max for p in partials]),
        nonfinite=sum(p.nonfinite for p in partials),
        sample=torch.cat([p.sample for p in partials], dim=1),
    )


#: Sample values finalized together: a block that stays in the CPU cache while
#: it is sorted and read, however many layers a step has.
BLOCK_VALUES = 1 << 18


def finalize(partials: list[Partial], sketch: Sequence[torch.Tensor | None] | None = None) -> Record:
    """Stored statistics of many partials at once, their channels stacked in order.

    Runs once per recorded step, over all of its layers, a block of samples at
    a time: one sort per block instead of one per layer. Samples of different
    widths are padded with +inf, which counts as no value. On the CPU the work
    runs in numpy, whose calls on small arrays cost a microsecond where torch's
    cost several; elsewhere in torch, on the device (no host sync).

    Args:
        partials: the step's records.
        sketch: per partial, the channel indices that get quantiles and bin means
            (None: every channel); moments, extrema and the zero fraction are
            kept for every channel. None: every channel of every partial.
    """
    sketch = [None] * len(partials) if sketch is None else list(sketch)
    if all(p.sample.device.type == "cpu" for p in partials):
        return _finalize_in_numpy(partials, sketch)
    return _finalize_in_torch(partials, sketch)


def _finalize_in_numpy(partials: list[Partial], sketch: list[torch.Tensor | None]) -> Record:
    """:func:`finalize` of CPU partials: the arithmetic of :func:`_finalize_in_torch`, in numpy.

    In a training step each call costs several microseconds whatever its size,
    so the work is done a block of rows at a time, not a layer at a time: the
    zero fraction of the sketched rows too.
    """

    def column(field: str) -> np.ndarray:
        return np.concatenate([getattr(p, field).numpy() for p in partials])

    samples = [p.sample.numpy() for p in partials]
    subset = any(rows is not None for rows in sketch)
    chosen = [sample if rows is None else sample[rows.numpy()] for sample, rows in zip(samples, sketch)]
    zero_frac, quantiles, binmeans = _sample_statistics_of(chosen)
    sketched = None
    if subset:
        sketched = torch.cat([_row_mask(p.sample, rows) for p, rows in zip(partials, sketch)])
        parts, start = [], 0
        for p, sample, rows, rows_chosen in zip(partials, samples, sketch, chosen):
            parts.append(zero_frac[start : start + sample.shape[0]] if rows is None else _zero_fraction_of(p))
            start += rows_chosen.shape[0]
        zero_frac = np.concatenate(parts)
    count = column("count")
    stats = np.empty((count.shape[0], len(STAT_NAMES)))
    stats[:, 0] = count
    with np.errstate(divide="ignore", invalid="ignore"):  # NaN where no value was finite
        stats[:, 1] = np.where(count > 0, column("mean"), np.nan)
        stats[:, 2] = column("m2") / count
    stats[:, 3] = column("min")
    stats[:, 4] = column("max")
    stats[:, 5] = column("nonfinite")
    stats[:, 6] = zero_frac
    return Record(
        stats=torch.from_numpy(stats),
        quantiles=torch.from_numpy(quantiles),
        binmeans=torch.from_numpy(binmeans),
        sketched=sketched,
    )


def _sample_statistics_of(samples: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero fraction (float64), quantiles and bin means (float32) of every row of ``samples``, in order.

    Samples of one width are finalized together, a block of :data:`BLOCK_VALUES`
    at a time, so no row is padded: a narrow layer's rows sort as fast as their
    width allows, and full rows take the fast path of :func:`_statistics_of_rows`.
    """
    rows = sum(sample.shape[0] for sample in samples)
    zero_frac = np.empty(rows)
    quantiles = np.empty((rows, len(QUANTILE_LEVELS)), np.float32)
    binmeans = np.empty((rows, N_BINS), np.float32)
    starts = np.cumsum([0] + [sample.shape[0] for sample in samples])
    by_width: dict[int, list[int]] = {}
    for i, sample in enumerate(samples):
        by_width.setdefault(sample.shape[1], []).append(i)
    for indices in by_width.values():
        order = iter(indices)
        for block in _blocks([samples[i] for i in indices]):
            statistics = _statistics_of_rows(np.concatenate(block))
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


def _zero_fraction_of(partial: Partial) -> np.ndarray:
    """Per row of a CPU partial's sample, the fraction of its finite values that are exactly zero (NaN for none)."""
    sample = partial.sample.numpy()
    finite = sample.shape[1]
    if partial.nonfinite.numpy().any():  # only a channel with non-finite values has them (as +inf) in its sample
        finite = finite - np.count_nonzero(sample == np.inf, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _zero_count(sample) / finite


def _zero_count(rows: np.ndarray) -> np.ndarray:
    """Exact zeros per row (int64): a byte sum, about twice ``count_nonzero``'s speed."""
    return (rows == 0).view(np.uint8).sum(1, dtype=np.int64)


def _statistics_of_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero fraction (float64), quantiles (linear interpolation) and equal-mass bin means (float32) of each
    row's finite values.

    Overwrites ``rows``; the numpy twin of :func:`_zero_fraction` and :func:`_sample_statistics`.
    """
    count, width = rows.shape
    zeros = _zero_count(rows)
    if width == 2 * _FAST_SORT:
        bins = _rank_bins(rows)
        if np.isfinite(bins[:, -1].max()):  # +inf (non-finite values) would rank last
            return zeros / width, *_statistics_of_bins(bins)
        rows = bins.reshape(count, width)  # each row's values, permuted: sorted below
    _sort_rows(rows)  # +inf (non-finite values) sorts last
    levels = np.array(QUANTILE_LEVELS)
    if width % N_BINS == 0 and np.isfinite(rows[:, -1]).all():  # the common case: every row full and finite
        position = levels * (width - 1)
        low = np.floor(position).astype(np.intp)
        high = np.minimum(low + 1, width - 1)
        at_low, at_high = rows[:, low].astype(np.float64), rows[:, high].astype(np.float64)
        quantiles = at_low + (position - low) * (at_high - at_low)
        runs = torch.from_numpy(rows).view(count, N_BINS, width // N_BINS)
        binmeans = runs.sum(2, dtype=torch.float64).numpy() / (width // N_BINS)  # torch: see _statistics_of_bins
        return zeros / width, _float32(quantiles), _float32(binmeans)
    valid = np.count_nonzero(rows < np.inf, axis=1)[:, None]  # (rows, 1)
    last = np.maximum(valid - 1, 0)
    position = levels[None, :] * last
    low = np.floor(position).astype(np.intp)
    high = np.minimum(low + 1, last)
    at_low = np.take_along_axis(rows, low, 1).astype(np.float64)
    at_high = np.take_along_axis(rows, high, 1).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # rows with no finite value read +inf: NaN below
        quantiles = at_low + (position - low) * (at_high - at_low)
        # Sums of the first i values; only i <= valid is read, where every value is finite.
        cumulative = np.cumsum(rows, axis=1, dtype=np.float64)

    def sum_of_first(count: np.ndarray) -> np.ndarray:
        return np.where(count > 0, np.take_along_axis(cumulative, np.maximum(count - 1, 0), 1), 0.0)

    edges = np.round(np.arange(N_BINS + 1, dtype=np.float64)[None, :] * valid / N_BINS).astype(np.intp)
    start, stop = edges[:, :-1], edges[:, 1:]
    bin_width = stop - start
    sums = sum_of_first(stop) - sum_of_first(start)
    # A bin is empty only when a channel has fewer values than bins: take its value.
    single = np.take_along_axis(rows, np.minimum(start, last), 1).astype(np.float64)
    binmeans = np.where(bin_width > 0, sums / np.maximum(bin_width, 1), single)
    empty = valid == 0
    quantiles = np.where(empty, np.nan, quantiles)
    binmeans = np.where(empty, np.nan, binmeans)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero_frac = zeros / valid[:, 0]
    return zero_frac, _float32(quantiles), _float32(binmeans)


def _float32(values: np.ndarray) -> np.ndarray:
    """``values`` in float32, as stored; beyond its range (float64 inputs) they are ±inf, as torch casts them."""
    with np.errstate(over="ignore"):
        return values.astype(np.float32)


def _sort_rows(rows: np.ndarray) -> None:
    """Sort each row of ``rows`` ascending, in place."""
    rows.sort(axis=1)


#: Rows of up to this many values sort about 4x faster per value than longer ones in numpy
#: on this machine (a sorting network: 0.6 against 4.7 µs for a row of 1,024 float32
#: values, docs/performance.md), so rows of twice this width are sorted in halves and merged.
_FAST_SORT = 512


def _rank_bins(rows: np.ndarray) -> np.ndarray:
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
    """Quantiles and bin means of full finite rows from their rank bins (:func:`_rank_bins`), as float32.

    A quantile reads the values of two neighbouring ranks: the first of a run is its minimum,
    the last its maximum, and the few runs that hold a rank strictly inside are sorted.
    """
    count, _, size = bins.shape
    low, high, fraction, inner = _bin_reads(N_BINS * size)
    runs = torch.from_numpy(bins)  # torch reduces along a short axis some 10x faster than numpy
    extrema = [runs.amin(2).numpy(), runs.amax(2).numpy()]
    table = np.concatenate([*extrema, np.sort(bins[:, inner], axis=2).reshape(count, -1)], axis=1)
    at_low, at_high = table[:, low].astype(np.float64), table[:, high].astype(np.float64)
    quantiles = at_low + fraction * (at_high - at_low)
    binmeans = runs.sum(2, dtype=torch.float64).numpy() / size
    return _float32(quantiles), _float32(binmeans)


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


def _finalize_in_torch(partials: list[Partial], sketch: list[torch.Tensor | None]) -> Record:
    """:func:`finalize` in torch, on the partials' device."""
    count = torch.cat([p.count for p in partials]).double()
    nonfinite = torch.cat([p.nonfinite for p in partials]).double()
    mean = torch.where(count > 0, torch.cat([p.mean for p in partials]).double(), float("nan"))
    var = torch.cat([p.m2 for p in partials]).double() / count  # NaN where no value was finite
    zero_frac = torch.cat([_zero_fraction(p.sample) for p in partials])
    stats = torch.stack(
        [
            count,
            mean,
            var,
            torch.cat([p.min for p in partials]).double(),
            torch.cat([p.max for p in partials]).double(),
            nonfinite,
            zero_frac,
        ],
        dim=1,
    )
    sketched = None
    samples = [p.sample for p in partials]
    if any(rows is not None for rows in sketch):
        sketched = torch.cat([_row_mask(p.sample, rows) for p, rows in zip(partials, sketch)])
        samples = [p.sample if rows is None else p.sample[rows.to(p.sample.device)] for p, rows in zip(partials, sketch)]
    blocks = [_sample_statistics(_padded_samples(block)) for block in _blocks(samples)]
    quantiles, binmeans = (torch.cat(parts) for parts in zip(*blocks))
    return Record(stats=stats, quantiles=quantiles, binmeans=binmeans, sketched=sketched)


def _blocks(samples: list) -> list[list]:
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


def _padded_samples(samples: list[torch.Tensor]) -> torch.Tensor:
    """``samples`` as one new (rows, width) tensor, short rows padded with +inf."""
    width = max(sample.shape[1] for sample in samples)
    return torch.cat(
        [
            sample if sample.shape[1] == width
            else torch.nn.functional.pad(sample, (0, width - sample.shape[1]), value=float("inf"))
            for sample in samples
        ]
    )


def _zero_fraction(sample: torch.Tensor) -> torch.Tensor:
    """Per row, the fraction of the finite sampled values that are exactly zero (float64; NaN for none)."""
    finite = (sample < float("inf")).sum(1)
    return (sample == 0).sum(1).double() / finite


def _row_mask(sample: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """A (C,) bool mask of ``rows`` (None: all) among ``sample``'s rows, on the CPU."""
    mask = torch.zeros(sample.shape[0], dtype=torch.bool)
    mask[slice(None) if rows is None else rows.cpu()] = True
    return mask


def _sample_statistics(sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantiles (linear interpolation) and equal-mass bin means of each row's finite values.

    Sorts ``sample`` in place.
    """
    ordered = _sort_rows_(sample)  # float32; +inf (non-finite, padding) sorts last
    rows, width = ordered.shape
    # On the CPU, check for the common case: every row full and finite (+inf sorts last).
    if ordered.device.type == "cpu" and width % N_BINS == 0 and bool(ordered[:, -1].isfinite().all()):
        quantiles, binmeans = _full_row_statistics(ordered)
        return quantiles.float(), binmeans.float()
    valid = (ordered < float("inf")).sum(1, keepdim=True)  # (C, 1)
    last = (valid - 1).clamp_min(0)
    position = _levels_on(sample.device)[None, :] * last
    lo = position.floor().long()
    hi = torch.minimum(lo + 1, last)
    frac = position - lo
    at_lo, at_hi = ordered.gather(1, lo).double(), ordered.gather(1, hi).double()
    quantiles = at_lo + frac * (at_hi - at_lo)

    # Sums of the first i values; only i <= valid is read, where every value is finite.
    cumulative = ordered.cumsum(1, dtype=torch.float64)

    def sum_of_first(count: torch.Tensor) -> torch.Tensor:
        return torch.where(count > 0, cumulative.gather(1, (count - 1).clamp_min(0)), 0.0)

    k = torch.arange(N_BINS + 1, device=sample.device, dtype=torch.float64)
    edges = torch.round(k[None, :] * valid / N_BINS).long()  # (C, K+1)
    start, stop = edges[:, :-1], edges[:, 1:]
    bin_width = (stop - start).double()
    sums = sum_of_first(stop) - sum_of_first(start)
    # A bin is empty only when a channel has fewer values than bins: take its value.
    single = ordered.gather(1, torch.minimum(start, last)).double()
    binmeans = torch.where(bin_width > 0, sums / bin_width.clamp_min(1.0), single)

    empty = valid == 0
    quantiles = torch.where(empty, float("nan"), quantiles)
    binmeans = torch.where(empty, float("nan"), binmeans)
    return quantiles.float(), binmeans.float()


def _full_row_statistics(ordered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantiles and bin means of sorted rows that are all finite and split evenly into bins.

    The common case (a full default sample): every row has the same positions,
    so quantiles are two column reads and bins a reshape.
    """
    rows, width = ordered.shape
    position = _levels_on(ordered.device) * (width - 1)
    lo = position.floor().long()
    hi = torch.clamp(lo + 1, max=width - 1)
    frac = position - lo
    at_lo, at_hi = ordered[:, lo].double(), ordered[:, hi].double()
    binmeans = ordered.view(rows, N_BINS, width // N_BINS).sum(2, dtype=torch.float64) / (width // N_BINS)
    return at_lo + frac * (at_hi - at_lo), binmeans


@functools.cache
def _levels_on(device: torch.device) -> torch.Tensor:
    """:data:`QUANTILE_LEVELS` as a float64 tensor on ``device``, copied there once."""
    return torch.tensor(QUANTILE_LEVELS, dtype=torch.float64).to(device)


def _sort_rows_(sample: torch.Tensor) -> torch.Tensor:
    """Sort each row ascending in place: numpy's vectorized sort on the CPU (about 4x torch's here)."""
    if sample.device.type == "cpu":
        sample.numpy().sort(axis=1)
        return sample
    return sample.sort(dim=1).values
