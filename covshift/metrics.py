"""Drift metrics as pure, vectorized functions of per-channel summaries.

Every function takes arrays with one row per compared pair (a channel at a step
against its reference) and returns one value per row; nothing here knows about
runs or DataFrames (:mod:`covshift.drift` does). Quantile functions are given by
their *knots*: values ``(N, K)`` at the increasing ``levels`` ``(K,)`` that run
from 0 (the minimum) to 1 (the maximum), linear in between
(:func:`quantile_knots` builds them from stored summaries).

Formulas, accuracy and thresholds: ``docs/metrics.md``.

>>> import numpy as np
>>> levels = np.array([0.0, 0.5, 1.0])
>>> ks(np.array([[0.0, 1.0, 2.0]]), np.array([[1.0, 2.0, 3.0]]), levels)
array([0.5])
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

#: Reference-quantile bins used by :func:`psi` and :func:`js`: deciles, the
#: convention the PSI thresholds (0.1, 0.2) were set for.
N_PSI_BINS = 10
#: Probability floor of an empty bin in :func:`psi` (as in common PSI tools).
PSI_EPSILON = 1e-4
#: Metrics computed from the two quantile functions (see :func:`cdf_metrics`).
CDF_METRICS = ("ks", "psi", "js")


def mean_shift(mu_t: np.ndarray, mu_r: np.ndarray, sd_r: np.ndarray | None = None) -> np.ndarray:
    """``|mu_t - mu_r|``, divided by the reference's standard deviation ``sd_r`` when given.

    >>> mean_shift(np.array([1.0]), np.array([0.0]), np.array([2.0]))
    array([0.5])
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.abs(np.asarray(mu_t) - np.asarray(mu_r))
        return shift if sd_r is None else shift / sd_r


def std_ratio(sd_t: np.ndarray, sd_r: np.ndarray) -> np.ndarray:
    """``|log(sd_t / sd_r)|``: symmetric and scale-free; NaN where either is 0.

    >>> std_ratio(np.array([2.0]), np.array([1.0])).round(4)
    array([0.6931])
    """
    sd_t, sd_r = np.asarray(sd_t, dtype=float), np.asarray(sd_r, dtype=float)
    ok = (sd_t > 0) & (sd_r > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, np.abs(np.log(np.where(ok, sd_t / np.where(ok, sd_r, 1.0), 1.0))), np.nan)


def wasserstein(binmeans_t: np.ndarray, binmeans_r: np.ndarray, sd_r: np.ndarray | None = None) -> np.ndarray:
    """W1 from equal-mass bin means: ``mean_k |B_t[k] - B_r[k]|`` (÷ ``sd_r`` when given).

    With bins of equal mass, ``W1 = ∫|Q_t(u) - Q_r(u)| du`` and the bin mean is
    the mean of ``Q`` over the bin, so this is exact unless the two quantile
    functions cross inside a bin (then it is a lower bound).

    >>> wasserstein(np.array([[0.0, 1.0]]), np.array([[0.5, 1.5]]))
    array([0.5])
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        w1 = np.abs(np.asarray(binmeans_t) - np.asarray(binmeans_r)).mean(axis=1, dtype=np.float64)
        return w1 if sd_r is None else w1 / sd_r


def gaussian_w2(
    mu_t: np.ndarray, sd_t: np.ndarray, mu_r: np.ndarray, sd_r: np.ndarray, normalize: bool = True
) -> np.ndarray:
    """W2 between the normals with the two means and deviations: ``sqrt(Δμ² + Δσ²)``.

    Divided by ``sd_r`` when ``normalize``.

    >>> gaussian_w2(np.array([3.0]), np.array([5.0]), np.array([0.0]), np.array([1.0]), normalize=False)
    array([5.])
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        w2 = np.hypot(np.asarray(mu_t) - mu_r, np.asarray(sd_t) - sd_r)
        return w2 / sd_r if normalize else w2


def ks(knots_t: np.ndarray, knots_r: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Kolmogorov-Smirnov distance ``max_x |F_t(x) - F_r(x)|`` of two quantile functions.

    The distribution functions are the exact inverses of the piecewise-linear
    quantile functions (jumps where a quantile function is flat, e.g. the zeros
    after a ReLU); the maximum is taken over the knots of both, on both sides
    of every jump.
    """
    return cdf_metrics(knots_t, knots_r, levels, ("ks",))["ks"]


def psi(knots_t: np.ndarray, knots_r: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Population stability index over the reference's deciles.

    ``Σ_b (p_t - p_r) · ln(p_t / p_r)`` over the :data:`N_PSI_BINS` bins cut at
    the reference quantiles ``Q_r(b/10)``; bin probabilities below
    :data:`PSI_EPSILON` are raised to it. Bins are right-closed, so an atom (all
    the zeros of a ReLU) lies in one bin.
    """
    return cdf_metrics(knots_t, knots_r, levels, ("psi",))["psi"]


def js(knots_t: np.ndarray, knots_r: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance (natural log, as ``scipy.spatial.distance.jensenshannon``).

    Over the same reference-decile bins as :func:`psi`; in ``[0, sqrt(ln 2)]``.
    """
    return cdf_metrics(knots_t, knots_r, levels, ("js",))["js"]


def quantile_knots(
    quantiles: np.ndarray, minimum: np.ndarray, maximum: np.ndarray, levels: Iterable[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Knots of the quantile function: the minimum at level 0, the quantiles, the maximum at 1.

    Args:
        quantiles: ``(N, K)`` values at ``levels`` (strictly inside (0, 1)).
        minimum: ``(N,)`` smallest values.
        maximum: ``(N,)`` largest values.
        levels: the ``K`` quantile levels.

    Returns:
        ``(knots, knot_levels)``: float32 ``(N, K + 2)`` and ``(K + 2,)``.

    >>> knots, lv = quantile_knots(np.array([[1.0]]), np.array([0.0]), np.array([4.0]), [0.5])
    >>> knots.tolist(), lv.tolist()
    ([[0.0, 1.0, 4.0]], [0.0, 0.5, 1.0])
    """
    quantiles = np.asarray(quantiles, dtype=np.float32)
    knots = np.empty((quantiles.shape[0], quantiles.shape[1] + 2), dtype=np.float32)
    knots[:, 0] = minimum
    knots[:, 1:-1] = quantiles
    knots[:, -1] = maximum
    knot_levels = np.concatenate([[0.0], np.asarray(list(levels), dtype=np.float32), [1.0]])
    return knots, knot_levels.astype(np.float32)


def cdf_metrics(
    knots_t: np.ndarray, knots_r: np.ndarray, levels: np.ndarray, which: Iterable[str] = CDF_METRICS
) -> dict[str, np.ndarray]:
    """KS, PSI and JS of each row pair of quantile functions.

    Args:
        knots_t: ``(N, K)`` quantile-function values of the current distribution.
        knots_r: ``(N, K)`` same for the reference.
        levels: ``(K,)`` increasing levels from 0 to 1 shared by both.
        which: names among :data:`CDF_METRICS`.

    Returns:
        A dict from each requested name to its ``(N,)`` float64 values.
    """
    which = tuple(which)
    unknown = set(which) - set(CDF_METRICS)
    if unknown:
        raise ValueError(f"which must name metrics among {CDF_METRICS}, got {sorted(unknown)}")
    knots_t = np.asarray(knots_t, dtype=np.float32)
    knots_r = np.asarray(knots_r, dtype=np.float32)
    levels = np.asarray(levels, dtype=np.float32)
    if knots_t.shape != knots_r.shape or knots_t.shape[1:] != levels.shape:
        raise ValueError(
            f"knots_t {knots_t.shape}, knots_r {knots_r.shape} and levels {levels.shape} "
            "must be (N, K), (N, K) and (K,)"
        )
    out: dict[str, np.ndarray] = {}
    with np.errstate(all="ignore"):
        if "ks" in which:
            out["ks"] = _merged_ks(knots_t, knots_r, levels).astype(np.float64)
        if {"psi", "js"} & set(which):
            edges = _decile_edges(knots_r, levels)
            p_t, p_r = (
                np.clip(np.diff(cdf_at(k, levels, edges), axis=1, prepend=0.0, append=1.0), 0.0, 1.0)
                for k in (knots_t, knots_r)
            )
            if "psi" in which:
                a, b = np.maximum(p_t, PSI_EPSILON), np.maximum(p_r, PSI_EPSILON)
                out["psi"] = ((a - b) * np.log(a / b)).sum(axis=1)
            if "js" in which:
                m = 0.5 * (p_t + p_r)
                kl_t = np.where(p_t > 0, p_t * np.log(p_t / m), 0.0).sum(axis=1)
                kl_r = np.where(p_r > 0, p_r * np.log(p_r / m), 0.0).sum(axis=1)
                out["js"] = np.sqrt(np.maximum(0.5 * (kl_t + kl_r), 0.0))
    bad = ~(np.isfinite(knots_t).all(axis=1) & np.isfinite(knots_r).all(axis=1))
    for values in out.values():
        values[bad] = np.nan
    return out


def _decile_edges(knots_r: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """``Q_r(b / N_PSI_BINS)`` for the inner bin edges, interpolated on the knots (N, B-1)."""
    targets = np.arange(1, N_PSI_BINS, dtype=np.float32) / N_PSI_BINS
    upper = np.clip(np.searchsorted(levels, targets, side="right"), 1, len(levels) - 1)
    lower = upper - 1
    weight = (targets - levels[lower]) / (levels[upper] - levels[lower])
    lo, hi = knots_r[:, lower], knots_r[:, upper]
    return lo + weight * (hi - lo)


def cdf_at(knots: np.ndarray, levels: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Right-continuous CDF of each row's piecewise-linear quantile function at the points ``x``.

    Args:
        knots: ``(N, K)`` quantile-function values at ``levels`` (0 ... 1).
        levels: ``(K,)`` their levels.
        x: ``(N, Q)`` points, per row.

    Returns:
        ``(N, Q)`` float32 values of ``F(x) = max{u : Q(u) <= x}`` (0 below the minimum).

    >>> cdf_at(np.array([[0.0, 0.0, 2.0]]), np.array([0.0, 0.5, 1.0]), np.array([[-1.0, 0.0, 1.0, 2.0]]))
    array([[0.  , 0.5 , 0.75, 1.  ]], dtype=float32)
    """
    levels = np.asarray(levels, dtype=np.float32)
    n, k = np.shape(knots)
    # Rows along the last axis: each step of the loop over the K knots is N wide.
    by_knot = np.ascontiguousarray(np.asarray(knots, dtype=np.float32).T)  # (K, N)
    points = np.ascontiguousarray(np.asarray(x, dtype=np.float32).T)  # (Q, N)
    count = np.zeros(points.shape, np.uint8 if k < 256 else np.int32)  # knots at or below each point
    below = np.empty(points.shape, bool)
    for j in range(k):
        np.less_equal(by_knot[j], points, out=below)
        np.add(count, below, out=count)
    upper = np.clip(count, 1, k - 1).astype(np.intp)
    flat = by_knot.reshape(-1)
    column = np.arange(n)
    x0, x1 = flat[(upper - 1) * n + column], flat[upper * n + column]
    p0, p1 = levels[upper - 1], levels[upper]
    with np.errstate(all="ignore"):
        fraction = np.clip((points - x0) / np.maximum(x1 - x0, np.float32(1e-30)), 0, 1)
    return np.where(count >= k, np.float32(1), p0 + fraction * (p1 - p0)).astype(np.float32).T


#: Rows merged at once by :class:`_Merger`: its buffers (~8 MB) are reused block
#: after block, as fresh large arrays cost a page fault per 4 KiB.
MERGE_BLOCK = 1024


def _merged_ks(knots_t: np.ndarray, knots_r: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """KS distance of every row pair, merged block by block."""
    n, k = knots_t.shape
    distance = np.empty(n, np.float32)
    merger = _Merger(min(max(n, 1), MERGE_BLOCK), k, levels)
    for lo in range(0, n, MERGE_BLOCK):
        part = slice(lo, lo + MERGE_BLOCK)
        merger.run(knots_t[part], knots_r[part], distance[part])
    return distance


class _Merger:
    """Merges the quantile functions of blocks of row pairs in preallocated buffers.

    Each row's knots of r and of t are merged by one sort of packed integer keys
    (the value's order-preserving bits above the column's tag). At ties the tag
    puts r first; within a run of equal values the first position then sees both
    distribution functions' left limits and the last position their right
    values, which are the only places a jump can maximise ``|F_t - F_r|``.
    Each CDF at every merged position comes from the previous and the next knot
    of that distribution (forward and backward fills along the merged order: a
    loop over the positions, each step ``rows`` wide) by linear interpolation.
    """

    def __init__(self, rows: int, k: int, levels: np.ndarray) -> None:
        self.k = k
        width = self.width = 2 * k
        self.shift = np.uint64(max(int(width - 1).bit_length(), 1))
        self.columns = np.arange(width, dtype=np.uint64)
        self.table = np.concatenate([levels, levels]).astype(np.float32)
        f32, u32 = np.float32, np.uint32
        self.values = np.empty((rows, width), f32)
        self.ordered = np.empty((rows, width), u32)
        self.keys = np.empty((rows, width), np.uint64)
        self.merged = np.empty((width, rows), np.uint64)  # positions along axis 0
        self.bits = np.empty((width, rows), u32)
        self.mask = np.empty((width, rows), u32)
        self.tag = np.empty((width, rows), np.int32)
        self.level = np.empty((width, rows), f32)
        self.off_r = np.empty((width, rows), u32)
        self.off_t = np.empty((width, rows), u32)
        self.flag = np.empty((2, width, rows), bool)
        self.boundary = np.empty((width, rows), f32)
        self.prev = np.empty((4, width, rows), f32)
        self.after = np.empty((4, width, rows), f32)
        self.gap = np.empty((2, width, rows), f32)
        self.cdf = np.empty((2, width, rows), f32)
        self.diff = np.empty((width, rows), f32)

    def run(self, knots_t: np.ndarray, knots_r: np.ndarray, distance: np.ndarray) -> None:
        """Fill ``distance`` with the KS distance of each row pair of one block."""
        n, k, width = len(knots_t), self.k, self.width
        values, ordered, keys = self.values[:n], self.ordered[:n], self.keys[:n]
        values[:, :k], values[:, k:] = knots_r, knots_t
        np.add(values, np.float32(0.0), out=values)  # -0.0 -> 0.0
        # float32 -> uint32 in the floats' order: flip the sign bit, invert negatives.
        np.right_shift(values.view(np.int32), 31, out=ordered.view(np.int32))
        np.bitwise_or(ordered, np.uint32(1 << 31), out=ordered)
        np.bitwise_xor(ordered, values.view(np.uint32), out=ordered)
        np.copyto(keys, ordered)
        np.left_shift(keys, self.shift, out=keys)
        np.bitwise_or(keys, self.columns, out=keys)
        keys.sort(axis=1)
        merged, bits, mask, tag = self.merged[:, :n], self.bits[:, :n], self.mask[:, :n], self.tag[:, :n]
        np.copyto(merged, keys.T)
        np.copyto(tag, merged & ((np.uint64(1) << self.shift) - np.uint64(1)), casting="unsafe")
        np.copyto(bits, merged >> self.shift, casting="unsafe")
        np.right_shift(bits.view(np.int32), 31, out=mask.view(np.int32))  # ones where positive
        np.invert(mask, out=mask)
        np.bitwise_or(mask, np.uint32(1 << 31), out=mask)
        np.bitwise_xor(bits, mask, out=bits)
        x = bits.view(np.float32)
        level = np.take(self.table, tag, out=self.level[:, :n])
        # 0 at a distribution's own knots, -inf elsewhere (bits 0xFF800000): x + off is x or -inf.
        minus_inf = np.uint32(0xFF800000)
        flag = self.flag[:, :, :n]
        off_r, off_t = self.off_r[:, :n], self.off_t[:, :n]
        np.greater_equal(tag, k, out=flag[0])
        np.multiply(flag[0], minus_inf, out=off_r)
        np.less(tag, k, out=flag[0])
        np.multiply(flag[0], minus_inf, out=off_t)
        off_r, off_t = off_r.view(np.float32), off_t.view(np.float32)
        boundary = self.boundary[:, :n]  # 1 at the first or last of a run of equal values
        np.not_equal(x[1:-1], x[:-2], out=flag[0, 1:-1])
        np.not_equal(x[1:-1], x[2:], out=flag[1, 1:-1])
        np.logical_or(flag[0, 1:-1], flag[1, 1:-1], out=flag[0, 1:-1])
        boundary[0] = boundary[-1] = 1
        np.copyto(boundary[1:-1], flag[0, 1:-1])
        # Each distribution's (value, level) of its previous knot and of its next knot.
        prev, after = self.prev[:, :, :n], self.after[:, :, :n]
        for j, (source, off) in enumerate(((x, off_r), (level, off_r), (x, off_t), (level, off_t))):
            np.add(source, off, out=prev[j])
            np.subtract(source, off, out=after[j])
        low = x[0] - np.abs(x[0]) - 1
        high = x[-1] + np.abs(x[-1]) + 1
        zeros, ones = np.zeros(n, np.float32), np.ones(n, np.float32)
        np.maximum(prev[:, 0], np.stack([low, zeros, low, zeros]), out=prev[:, 0])
        np.minimum(after[:, -1], np.stack([high, ones, high, ones]), out=after[:, -1])
        for i in range(1, width):
            np.maximum(prev[:, i], prev[:, i - 1], out=prev[:, i])
            np.minimum(after[:, width - 1 - i], after[:, width - i], out=after[:, width - 1 - i])
        # F = p0 + (x - x0) / (x1 - x0) * (p1 - p0), for r and t at once; x1 == x0 only where x == x0.
        gap, cdf = self.gap[:, :, :n], self.cdf[:, :, :n]
        np.subtract(after[0::2], prev[0::2], out=gap)
        np.maximum(gap, np.float32(1e-30), out=gap)
        np.subtract(x, prev[0::2], out=cdf)
        np.divide(cdf, gap, out=cdf)
        np.subtract(after[1::2], prev[1::2], out=gap)
        np.multiply(cdf, gap, out=cdf)
        np.add(cdf, prev[1::2], out=cdf)
        diff = self.diff[:, :n]
        np.subtract(cdf[1], cdf[0], out=diff)
        np.abs(diff, out=diff)
        np.multiply(diff, boundary, out=diff)
        np.max(diff, axis=0, out=distance)
