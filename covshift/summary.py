"""Per-channel summaries of one tensor: the hot path of every hook.

A hook reduces a layer's input to a :class:`Partial` (sums, extrema, counts and
a small value sample per channel) without leaving the tensor's device and
without any host synchronisation. Partials from several calls in one step merge
exactly (:func:`merge`); :func:`finalize` turns them into the stored statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Quantile levels stored per channel: an even grid of 1/32 steps (fine enough
#: for the quantile function) plus the tails and the BatchNorm paper's 15/85.
QUANTILE_LEVELS: tuple[float, ...] = tuple(
    sorted({k / 32 for k in range(1, 32)} | {0.01, 0.05, 0.15, 0.85, 0.95, 0.99})
)
#: Equal-mass bins of the sorted sample whose means are stored: with them the
#: Wasserstein-1 distance is exact up to crossings of two quantile functions
#: inside one bin.
N_BINS = 32
#: Values per channel per record the quantiles are taken from (see docs/metrics.md
#: for the sampling error this implies).
DEFAULT_SAMPLE_SIZE = 1024

STAT_NAMES = ("count", "mean", "var", "min", "max", "nonfinite", "zero_frac")


def quantile_column(level: float) -> str:
    """Name of the stats() column holding the quantile at ``level`` (``q0.5``)."""
    return f"q{level:g}"


def binmean_column(k: int) -> str:
    """Name of the stats() column holding the mean of equal-mass bin ``k``."""
    return f"binmean_{k:02d}"


QUANTILE_COLUMNS: tuple[str, ...] = tuple(quantile_column(q) for q in QUANTILE_LEVELS)
BINMEAN_COLUMNS: tuple[str, ...] = tuple(binmean_column(k) for k in range(N_BINS))


@dataclass
class Partial:
    """Mergeable per-channel state of one or more tensors; every field has C rows."""

    count: torch.Tensor  # finite values, int64
    total: torch.Tensor  # sum of finite values, float64
    total_sq: torch.Tensor  # sum of squares of finite values, float64
    min: torch.Tensor
    max: torch.Tensor
    nonfinite: torch.Tensor  # int64
    sample: torch.Tensor  # (C, S) float32, non-finite values replaced by +inf


@dataclass
class Record:
    """Final statistics, one row per channel of each partial finalized together."""

    stats: torch.Tensor  # (rows, len(STAT_NAMES)) float64
    quantiles: torch.Tensor  # (rows, len(QUANTILE_LEVELS)) float32
    binmeans: torch.Tensor  # (rows, N_BINS) float32


class Summarizer:
    """Reduces tensors to :class:`Partial` along a channel axis.

    Holds the cache of sample positions, so one summarizer per tracker keeps
    state out of module scope. The sample takes the same positions in every
    record of a given shape: a fixed batch shows no sampling jitter.

    Args:
        sample_size: values per channel the quantiles come from; at or above the
            number of values per channel the sample is the whole channel (exact).
        seed: seed of the stratified sample positions.
    """

    def __init__(self, sample_size: int = DEFAULT_SAMPLE_SIZE, seed: int = 0) -> None:
        if not isinstance(sample_size, int) or sample_size < 1:
            raise ValueError(f"sample_size must be a positive int, got {sample_size!r}")
        self.sample_size = sample_size
        self.seed = seed
        self._positions: dict[tuple, torch.Tensor] = {}

    def summarize(self, x: torch.Tensor, channel_dim: int | None) -> Partial:
        """Summarize ``x`` per slice along ``channel_dim`` (None: the whole tensor)."""
        with torch.no_grad():
            x = x.detach()
            if x.dtype != torch.float32:
                x = x.float()
            if channel_dim is None:
                x = x.reshape(1, -1)
                channel_dim = 0
            channel_dim = channel_dim % x.ndim
            dims = tuple(d for d in range(x.ndim) if d != channel_dim)
            total = x.sum(dims) if dims else x.clone()
            if x.device.type == "cpu" and bool(torch.isfinite(total).all()):
                return self._summarize_finite(x, channel_dim, dims, total)
            # A non-finite sum means NaN/Inf somewhere (or overflow). Off the CPU,
            # checking would cost a host sync, so the masked path always runs there.
            return self._summarize_masked(x, channel_dim, dims)

    def _summarize_finite(self, x, channel_dim, dims, total) -> Partial:
        n = x.numel() // x.shape[channel_dim]
        count = torch.full_like(total, n, dtype=torch.int64)
        if dims:
            total_sq = (x * x).sum(dims)
            mn, mx = x.amin(dims), x.amax(dims)
        else:
            total_sq, mn, mx = x.double() ** 2, x.clone(), x.clone()
        return Partial(
            count=count,
            total=total.double(),
            total_sq=total_sq.double(),
            min=mn,
            max=mx,
            nonfinite=torch.zeros_like(count),
            sample=self._sample(x, channel_dim),
        )

    def _summarize_masked(self, x, channel_dim, dims) -> Partial:
        finite = torch.isfinite(x)
        clean = torch.where(finite, x, 0.0)
        reduce = (lambda t, fn: fn(t, dims)) if dims else (lambda t, fn: t)
        count = reduce(finite, torch.count_nonzero) if dims else finite.long()
        n = x.numel() // x.shape[channel_dim]
        inf = torch.tensor(float("inf"), device=x.device)
        nonfinite = n - count
        mn = reduce(torch.where(finite, x, inf), torch.amin)
        mx = reduce(torch.where(finite, x, -inf), torch.amax)
        total = clean.sum(dims) if dims else clean
        total_sq = (clean * clean).sum(dims) if dims else clean * clean
        sample = self._sample(x, channel_dim)
        sample = torch.where(torch.isfinite(sample), sample, inf)
        return Partial(
            count=count,
            total=total.double(),
            total_sq=total_sq.double(),
            min=torch.where(count > 0, mn, float("nan")),
            max=torch.where(count > 0, mx, float("nan")),
            nonfinite=nonfinite,
            sample=sample,
        )

    def _sample(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """(C, S) values per channel at fixed stratified positions; all values if few."""
        channels = x.shape[channel_dim]
        per_channel = x.numel() // channels
        if per_channel <= self.sample_size:
            return x.movedim(channel_dim, 0).reshape(channels, per_channel)
        key = (tuple(x.shape), channel_dim, x.device)
        index = self._positions.get(key)
        if index is None:
            if len(self._positions) > 64:  # e.g. many sequence lengths: start afresh
                self._positions.clear()
            index = self._stratified_index(x.shape, channel_dim).to(x.device)
            self._positions[key] = index
        return torch.take(x, index)

    def _stratified_index(self, shape: torch.Size, channel_dim: int) -> torch.Tensor:
        """Row-major flat indices (C, S): one random position in each of S equal strata.

        Random within strata avoids the aliasing a plain stride has with image
        widths; a fixed seed keeps the positions identical from record to record.
        """
        channels = shape[channel_dim]
        per_channel = int(torch.Size(shape).numel()) // channels
        s = self.sample_size
        generator = torch.Generator().manual_seed(self.seed)
        jitter = torch.rand(s, generator=generator, dtype=torch.float64)
        positions = ((torch.arange(s, dtype=torch.float64) + jitter) * (per_channel / s)).long()
        other = [size for d, size in enumerate(shape) if d != channel_dim]
        coords = torch.unravel_index(positions, tuple(other))
        strides = torch.empty(0).new_empty(shape).stride()
        other_strides = [st for d, st in enumerate(strides) if d != channel_dim]
        offsets = sum(c * st for c, st in zip(coords, other_strides))
        channel_offsets = torch.arange(channels) * strides[channel_dim]
        return channel_offsets[:, None] + offsets[None, :]


def merge(partials: list[Partial]) -> Partial:
    """Combine partials of the same channels (e.g. a weight-shared layer called twice).

    Counts, sums and extrema merge exactly; the samples are pooled (each call
    contributes its own sample, so calls weigh equally in the quantiles).
    """
    if len(partials) == 1:
        return partials[0]
    return Partial(
        count=sum(p.count for p in partials),
        total=sum(p.total for p in partials),
        total_sq=sum(p.total_sq for p in partials),
        min=torch.stack([p.min for p in partials]).amin(0),
        max=torch.stack([p.max for p in partials]).amax(0),
        nonfinite=sum(p.nonfinite for p in partials),
        sample=torch.cat([p.sample for p in partials], dim=1),
    )


def finalize(partials: list[Partial]) -> Record:
    """Stored statistics of many partials at once, their channels stacked in order.

    Runs at flush time, batched over every buffered layer and step: one sort
    for all samples instead of one per layer per step. Samples of different
    widths are padded with +inf, which counts as no value.
    """
    with torch.no_grad():
        count = torch.cat([p.count for p in partials]).double()
        nonfinite = torch.cat([p.nonfinite for p in partials]).double()
        mean = torch.cat([p.total for p in partials]) / count
        var = (torch.cat([p.total_sq for p in partials]) / count - mean * mean).clamp_min(0.0)
        width = max(p.sample.shape[1] for p in partials)
        sample = torch.cat(
            [torch.nn.functional.pad(p.sample, (0, width - p.sample.shape[1]), value=float("inf")) for p in partials]
        )
        quantiles, binmeans, zero_frac = _sample_statistics(sample)
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
    return Record(stats=stats, quantiles=quantiles, binmeans=binmeans)


def _sample_statistics(sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantiles (linear interpolation), equal-mass bin means and zero fraction of each row's finite values."""
    ordered = sample.sort(dim=1).values.double()  # +inf (non-finite) sorts last
    valid = torch.isfinite(ordered).sum(1, keepdim=True)  # (C, 1)
    zero_frac = (ordered == 0).sum(1) / valid.squeeze(1)
    last = (valid - 1).clamp_min(0)
    levels = torch.tensor(QUANTILE_LEVELS, dtype=torch.float64, device=sample.device)
    position = levels[None, :] * last
    lo = position.floor().long()
    hi = torch.minimum(lo + 1, last)
    frac = position - lo
    at_lo, at_hi = ordered.gather(1, lo), ordered.gather(1, hi)
    quantiles = at_lo + frac * (at_hi - at_lo)

    finite = torch.where(torch.isfinite(ordered), ordered, 0.0)
    cumulative = torch.nn.functional.pad(finite.cumsum(1), (1, 0))
    k = torch.arange(N_BINS + 1, device=sample.device, dtype=torch.float64)
    edges = torch.round(k[None, :] * valid / N_BINS).long()  # (C, K+1)
    start, stop = edges[:, :-1], edges[:, 1:]
    width = (stop - start).double()
    sums = cumulative.gather(1, stop) - cumulative.gather(1, start)
    # A bin is empty only when a channel has fewer values than bins: take its value.
    single = ordered.gather(1, torch.minimum(start, last))
    binmeans = torch.where(width > 0, sums / width.clamp_min(1.0), single)

    empty = valid == 0
    quantiles = torch.where(empty, float("nan"), quantiles)
    binmeans = torch.where(empty, float("nan"), binmeans)
    return quantiles.float(), binmeans.float(), zero_frac
