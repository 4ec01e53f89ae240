"""The stored statistics of a step's partials: moments, extrema, zero fractions, quantiles, bin means.

Runs once per recorded step, when it ends, over all of the step's layers
together. On the CPU the sample rows go to :mod:`covshift.summary.row_statistics`
(numpy); on other devices they stay there and torch does the same arithmetic.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from covshift.columns import N_BINS, QUANTILE_LEVELS, STAT_NAMES
from covshift.summary.row_statistics import bin_sums, blocks, statistics_by_width, zero_count
from covshift.summary.summarize import Partial, Record


def finalize(partials: list[Partial], sketch: Sequence[torch.Tensor | None] | None = None) -> Record:
    """Stored statistics of many partials at once, their channels stacked in order.

    Runs once per recorded step, over all of its layers, a cache-sized block of
    sample rows at a time: one sort per block instead of one per layer. On the
    CPU the rows go to numpy (:mod:`covshift.summary.row_statistics`), whose calls on
    small arrays cost a microsecond where torch's cost several; elsewhere torch
    does the same arithmetic on the device, with no host sync (samples of
    different widths padded with +inf, which counts as no value).

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
    zero_frac, quantiles, binmeans = statistics_by_width(chosen)
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


def _zero_fraction_of(partial: Partial) -> np.ndarray:
    """Per row of a CPU partial's sample, the fraction of its finite values that are exactly zero (NaN for none)."""
    sample = partial.sample.numpy()
    finite = sample.shape[1]
    if partial.nonfinite.numpy().any():  # only a channel with non-finite values has them (as +inf) in its sample
        finite = finite - np.count_nonzero(sample == np.inf, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return zero_count(sample) / finite


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
    statistics = [_sample_statistics(_padded_samples(block)) for block in blocks(samples)]
    quantiles, binmeans = (torch.cat(parts) for parts in zip(*statistics))
    return Record(stats=stats, quantiles=quantiles, binmeans=binmeans, sketched=sketched)


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

    Every row takes the general route: checking for full finite rows would cost a host sync.
    """
    ordered = sample.sort(dim=1).values  # +inf (non-finite values, padding) sorts last
    valid = (ordered < float("inf")).sum(1, keepdim=True)  # (C, 1)
    last = (valid - 1).clamp_min(0)
    position = _levels_on(sample.device)[None, :] * last
    lo = position.floor().long()
    hi = torch.minimum(lo + 1, last)
    frac = position - lo
    at_lo, at_hi = ordered.gather(1, lo).double(), ordered.gather(1, hi).double()
    gap = at_hi - at_lo  # overflows only between values near ±1e308 (float64 inputs): the weighted sum there
    quantiles = torch.where(gap.isfinite(), at_lo + frac * gap, at_lo * (1 - frac) + at_hi * frac)
    k = torch.arange(N_BINS + 1, device=sample.device, dtype=torch.float64)
    edges = torch.round(k[None, :] * valid / N_BINS).long()  # (C, K+1)
    start, stop = edges[:, :-1], edges[:, 1:]
    bin_width = (stop - start).double()
    sums = bin_sums(ordered, edges)
    # A bin is empty only when a channel has fewer values than bins: take its value.
    single = ordered.gather(1, torch.minimum(start, last)).double()
    binmeans = torch.where(bin_width > 0, sums / bin_width.clamp_min(1.0), single)

    empty = valid == 0
    quantiles = torch.where(empty, float("nan"), quantiles)
    binmeans = torch.where(empty, float("nan"), binmeans)
    return quantiles.to(sample.dtype), binmeans.to(sample.dtype)  # float64 inputs keep float64: ±1e300, not ±inf


@functools.cache
def _levels_on(device: torch.device) -> torch.Tensor:
    """:data:`QUANTILE_LEVELS` as a float64 tensor on ``device``, copied there once."""
    return torch.tensor(QUANTILE_LEVELS, dtype=torch.float64).to(device)
