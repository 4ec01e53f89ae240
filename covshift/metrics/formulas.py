"""Drift metrics as pure, vectorized functions of per-channel summaries.

Every function takes arrays with one row per compared pair (a channel at a step
against its reference) and returns one value per row; nothing here knows about
runs or DataFrames (:mod:`covshift.metrics.engine` does; :mod:`covshift.metrics.builtin` declares them). Quantile functions are given by
their *knots*: values ``(N, K)`` at the increasing ``levels`` ``(K,)`` that run
from 0 (the minimum) to 1 (the maximum), linear in between: a record's
``min``, its quantiles and its ``max``.

Formulas, accuracy and thresholds: ``docs/metrics.md``.

>>> import numpy as np
>>> levels = np.array([0.0, 0.5, 1.0])
>>> ks(np.array([[0.0, 1.0, 2.0]]), np.array([[1.0, 2.0, 3.0]]), levels)
array([0.5])
"""

from __future__ import annotations

import sys
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
        return np.where(ok, np.abs(np.log(sd_t / sd_r)), np.nan)


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
            edges, cdf_r = _reference_deciles(knots_r, levels)
            p_t, p_r = (
                np.clip(np.diff(cdf, axis=1, prepend=0.0, append=1.0), 0.0, 1.0)
                for cdf in (cdf_at(knots_t, levels, edges), cdf_r)
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


def _reference_deciles(knots_r: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inner bin edges ``Q_r(b / N_PSI_BINS)`` and ``F_r`` there, both ``(N, B-1)``.

    ``F_r`` equals :func:`cdf_at` of the edges; it is only searched for in rows
    where an edge reaches the knot above it (a flat stretch): elsewhere that
    knot is the first one above the edge.
    """
    targets = np.arange(1, N_PSI_BINS, dtype=np.float32) / N_PSI_BINS
    upper = np.clip(np.searchsorted(levels, targets, side="right"), 1, len(levels) - 1)
    lower = upper - 1
    weight = (targets - levels[lower]) / (levels[upper] - levels[lower])
    lo, hi = knots_r[:, lower], knots_r[:, upper]
    edges = lo + weight * (hi - lo)
    fraction = np.clip((edges - lo) / np.maximum(hi - lo, np.float32(1e-30)), 0, 1)
    cdf = levels[lower] + fraction * (levels[upper] - levels[lower])
    flat = ~(edges < hi).all(axis=1)
    if flat.any():
        cdf[flat] = cdf_at(knots_r[flat], levels, edges[flat])
    return edges, cdf


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


#: Row pairs merged at once by :class:`_Merger`: its buffers (~7 MB) stay in the
#: CPU caches and are reused block after block (fresh large arrays cost a page
#: fault per 4 KiB).
MERGE_BLOCK = 1024


def _merged_ks(knots_t: np.ndarray, knots_r: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """KS distance of every row pair, merged block by block."""
    n, k = knots_t.shape
    distance = np.empty(n, np.float32)
    merger = _Merger(min(max(n, 1), MERGE_BLOCK), k, levels)
    for lo in range(0, n, MERGE_BLOCK):
        block = slice(lo, lo + MERGE_BLOCK)
        merger.run(knots_t[block], knots_r[block], distance[block])
    return distance


class _Merger:
    """Merges the quantile functions of blocks of row pairs in preallocated buffers.

    One sort per row of packed integer keys (the value's order-preserving bits
    above the knot's slot) merges the knots of r and of t; at ties r comes
    first, each distribution's knots in order. A knot at merged position ``p``
    that is the ``o``-th of its own distribution then has ``c = p - o`` knots of
    the other one before it: ``F_other`` at the knot comes from that segment of
    the other quantile function by linear interpolation (for a knot of r, the
    left limit ``F_t(x-)``; for a knot of t, ``F_r(x)``), one gather per
    position. Within a run of equal values only the first position (both
    left limits) and the last (both right values) are kept, the only places a
    jump can maximise ``|F_t - F_r|``.
    """

    def __init__(self, rows: int, k: int, levels: np.ndarray) -> None:
        self.k = k
        width = 2 * k
        slot = np.r_[np.arange(k), np.arange(k + 1, width + 1)]  # r: o, t: k + 1 + o
        row = np.arange(rows)[:, None]
        # Low word of a key: the knot's own record, row * (2k + 1) + slot.
        self.own_index = (row * (width + 1) + slot).astype(np.uint32)
        # The other distribution's segment record: segment_base - own index.
        self.segment_base = (row * (2 * k + 2) + np.arange(width) + k + 1 + row * (width + 1)).astype(np.intp)
        f32 = np.float32
        self.values = np.empty((rows, width), f32)
        self.high = np.empty((rows, width), np.int32)
        self.keys = np.empty((rows, width), np.uint64)
        # The key's 32-bit words: low (own record index) and high (the value's order).
        words = self.keys.view(np.uint32).reshape(rows, width, 2)
        low, high = (0, 1) if sys.byteorder == "little" else (1, 0)
        self.low, self.high_word = words[..., low], words[..., high]
        # Own records (x, level) by slot; slot k is unused.
        self.own = np.zeros((rows, width + 1, 2), f32)
        self.own[:, :k, 1] = self.own[:, k + 1 :, 1] = levels
        # Segment records (Y, A, S, 0): F = A + (x - Y) * S on segment c = 0..k of each
        # distribution. Segment c of r serves knots of t (F_r(y), r_{c-1} <= y < r_c:
        # Y, A at its lower end), segment c of t knots of r (F_t(x-), t_{c-1} < x <= t_c:
        # Y, A at its upper end, exact where x == t_c). Segments 0 and k are F = 0 and 1.
        self.segments = np.zeros((rows, 2, k + 1, 4), f32)
        self.segments[:, 0, 1:k, 1] = levels[:-1]
        self.segments[:, 1, 1:k, 1] = levels[1:]
        self.segments[:, :, k, 1] = 1.0
        self.step = np.diff(levels).astype(f32)
        self.slope = np.empty((rows, 2, k - 1), f32)
        self.other = np.empty((rows, width), np.intp)
        self.own_at = np.empty((rows, width), np.intp)
        self.diff = np.empty((rows, width), f32)
        self.same = np.empty((rows, width - 1), bool)

    def run(self, knots_t: np.ndarray, knots_r: np.ndarray, distance: np.ndarray) -> None:
        """Fill ``distance`` with the KS distance of each row pair of one block."""
        n, k = len(knots_t), self.k
        values = self.values[:n]
        np.add(knots_r, np.float32(0.0), out=values[:, :k])  # -0.0 -> 0.0
        np.add(knots_t, np.float32(0.0), out=values[:, k:])
        # float32 -> uint32 in the floats' order: flip the sign bit, invert negatives.
        bits, high, low, ordered = values.view(np.int32), self.high[:n], self.low[:n], self.high_word[:n]
        np.right_shift(bits, 31, out=high)
        np.bitwise_or(high, np.int32(-(2**31)), out=high)
        np.bitwise_xor(high, bits, out=ordered.view(np.int32))
        low[...] = self.own_index[:n]
        keys = self.keys[:n]
        keys.sort(axis=1)
        own, segments, pair = self.own[:n], self.segments[:n], values.reshape(n, 2, k)
        own[:, :k, 0] = pair[:, 0]
        own[:, k + 1 :, 0] = pair[:, 1]
        slope = self.slope[:n]
        np.subtract(pair[:, :, 1:], pair[:, :, :-1], out=slope)
        np.divide(self.step, slope, out=slope)  # inf on flat segments, which no knot uses
        segments[:, :, 1:k, 2] = slope
        segments[:, 0, 1:, 0] = pair[:, 0]
        segments[:, 0, 0, 0] = pair[:, 0, 0]
        segments[:, 1, :k, 0] = pair[:, 1]
        segments[:, 1, k, 0] = pair[:, 1, -1]
        own_at, other = self.own_at[:n], self.other[:n]
        np.copyto(own_at, low)
        np.subtract(self.segment_base[:n], own_at, out=other)
        mine = np.take(own.reshape(-1).view(np.complex64), own_at).view(np.float32).reshape(n, -1, 2)
        theirs = np.take(segments.reshape(-1).view(np.complex128), other).view(np.float32).reshape(n, -1, 4)
        diff = self.diff[:n]
        np.subtract(mine[..., 0], theirs[..., 0], out=diff)
        np.multiply(diff, theirs[..., 2], out=diff)
        np.add(diff, theirs[..., 1], out=diff)
        np.subtract(diff, mine[..., 1], out=diff)
        np.abs(diff, out=diff)
        same = self.same[:n]  # equal neighbours: inside a run of equal values when both are
        np.equal(ordered[:, 1:], ordered[:, :-1], out=same)
        diff[:, 1:-1][same[:, 1:] & same[:, :-1]] = 0
        np.max(diff, axis=1, out=distance)
