"""Per-channel summaries of one tensor: the hot path of every hook.

A hook reduces a layer's input to a :class:`Partial` (sums, extrema, counts and
a small value sample per channel) without leaving the tensor's device and
without any host synchronisation. Partials from several calls in one step merge
exactly (:func:`merge`); :func:`covshift.finalize.finalize` turns them into the
stored statistics.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

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
    quantiles: torch.Tensor  # (sketched rows, len(QUANTILE_LEVELS)) float32; float64 for float64 inputs
    binmeans: torch.Tensor  # (sketched rows, N_BINS) float32; float64 for float64 inputs
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
        logical = _channel_view(x, channel_dim)
        view = _in_memory_order(logical)  # reduced as memory holds it; sampled in logical order, as always
        if x.device.type == "cpu":
            # On the CPU a check costs nothing: sums first, the two-pass path only
            # where they hold NaN, Inf or an overflow.
            partial = self._summarize_one_pass(view, logical)
            if partial is not None:
                return partial
        # Off the CPU a check would cost a host sync, so the two-pass path always runs there.
        return self._summarize_two_pass(view, logical)

    def _summarize_one_pass(self, view: torch.Tensor, logical: torch.Tensor) -> Partial | None:
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

        Inside a training step these calls cost about twice what they do in a
        tight loop, and a small call is mostly its fixed cost, so the common
        case takes as few calls as it can: four passes over the activations,
        each reduced along one axis and then across the other, the moments in
        float64, one check (docs/performance.md, "Recording speed").
        """
        before, channels, after = view.shape
        n = before * after
        total, total_sq, low, high = _first_pass(view)
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
            min=low,
            max=high,
            nonfinite=nonfinite,
            sample=self._sample(logical),
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

    def _summarize_two_pass(self, view: torch.Tensor, logical: torch.Tensor) -> Partial:
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
        sample = self._sample(logical)
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


def _first_pass(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel of a (before, C, after) view: Σx and Σx² (float64), min and max, each read in the faster
    order for its layout (four passes)."""
    rows = _folded(view)
    if rows is not None:  # few channels, innermost: down the (M/k, k·C) rows, then across the k
        k = rows.shape[1] // view.shape[1]
        return (rows.sum(0).view(k, -1).sum(0, dtype=torch.float64),
                rows.square().sum(0).view(k, -1).sum(0, dtype=torch.float64),
                rows.amin(0).view(k, -1).amin(0), rows.amax(0).view(k, -1).amax(0))
    # The first axis as _reduce takes it; the norm always runs along the contiguous axis.
    dim = 2 if view.shape[2] >= _LONG_ROW else 0
    rest = 0 if dim == 2 else 1
    return (view.sum(dim).sum(rest, dtype=torch.float64),
            torch.linalg.vector_norm(view, dim=2).square_().sum(0, dtype=torch.float64),
            view.amin(dim).amin(rest), view.amax(dim).amax(rest))


#: Rows at least this wide are reduced down their columns at full speed; narrower (M, C, 1) views are
#: folded to (M/k, k·C) first (amin down 73,728 rows of 20 channels took 5.2 ms, folded by 8 0.19 ms: one
#: thread, torch 2.14.1, a one-off timing on 2026-12-07; see docs/performance.md, "Compiled models").
_FOLD_WIDTH = 128


def _folded(view: torch.Tensor) -> torch.Tensor | None:
    """A contiguous (M, C, 1) view of few channels as (M/k, k·C) rows at least :data:`_FOLD_WIDTH` wide;
    None for other views."""
    rows, channels, after = view.shape
    if after != 1 or channels >= _FOLD_WIDTH or not view.is_contiguous():
        return None
    k = next((k for k in range(-(-_FOLD_WIDTH // channels), 65) if rows % k == 0), None)
    return None if k is None else view.reshape(rows // k, k * channels)


def _in_memory_order(view: torch.Tensor) -> torch.Tensor:
    """The values of a (before, C, after) view with the same per-channel statistics, laid out as memory
    holds them: (before·after, C, 1) where the channel axis is innermost in memory (a channels-last
    image, as torch.compile's kernels hand it over), so reductions read memory in order; else ``view``."""
    before, channels, after = view.shape
    if after > 1 and channels > 1 and view.stride() == (channels * after, 1, channels):
        return view.transpose(1, 2).reshape(before * after, channels, 1)
    return view


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
