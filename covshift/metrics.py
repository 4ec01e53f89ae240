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
#: Metrics computed from the quantile functions by one shared merge.
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
    """KS, PSI and JS of each row pair, sharing one merge of the two quantile functions.

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
    binned = {"psi", "js"} & set(which)
    edges = _decile_edges(knots_r, levels) if binned else np.empty((len(knots_r), 0), np.float32)
    with np.errstate(all="ignore"):
        distance, at_edges = _merged_cdfs(knots_t, knots_r, edges, levels)
        out: dict[str, np.ndarray] = {}
        if "ks" in which:
            out["ks"] = distance.astype(np.float64)
        if binned:
            p_t, p_r = (np.diff(f, axis=1, prepend=0.0, append=1.0).astype(np.float64) for f in at_edges)
            p_t, p_r = np.clip(p_t, 0.0, 1.0), np.clip(p_r, 0.0, 1.0)
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


def _merged_cdfs(
    knots_t: np.ndarray, knots_r: np.ndarray, edges: np.ndarray, levels: np.ndarray
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """KS distance and both CDFs at ``edges`` (right-continuous), row by row, without row loops.

    Each row's knots of r, of t and its edges are merged by one sort of packed
    integer keys (the value's order-preserving bits above the column's tag). At ties
    the tag puts r first, then t, then the edges; within a run of equal values
    the first position then sees both distribution functions' left limits and
    the last position their right values, which are the only places a jump can
    maximise ``|F_t - F_r|``. Each CDF at every merged position comes from the
    previous and next knot of that distribution (forward/backward fills along
    the merged order) by linear interpolation.
    """
    n, k = knots_t.shape
    e = edges.shape[1]
    width = 2 * k + e
    values = np.concatenate([knots_r, knots_t, edges], axis=1) + np.float32(0.0)  # -0.0 -> 0.0
    keys = _ordered_bits(values).astype(np.uint64)
    shift = np.uint64(max(int(width - 1).bit_length(), 1))
    keys <<= shift
    keys |= np.arange(width, dtype=np.uint64)
    keys.sort(axis=1)
    keys = np.ascontiguousarray(keys.T)  # (width, n): fills run along axis 0 in n-wide steps
    tag = (keys & ((np.uint64(1) << shift) - np.uint64(1))).astype(np.uint8 if width <= 256 else np.uint16)
    x = _from_ordered_bits((keys >> shift).astype(np.uint32))
    level = np.concatenate([levels, levels, np.zeros(e, np.float32)])[tag]
    low = x[0] - np.abs(x[0]) - 1
    high = x[-1] + np.abs(x[-1]) + 1
    f_r = _interpolated_cdf(x, level, (tag < k).astype(np.float32), low, high)
    f_t = _interpolated_cdf(x, level, ((tag >= k) & (tag < 2 * k)).astype(np.float32), low, high)
    if e:
        rows, cols = np.nonzero((tag >= 2 * k).T)  # row-major: each row's edges in order
        at_edges = (f_t.T[rows, cols].reshape(n, e), f_r.T[rows, cols].reshape(n, e))
    else:
        at_edges = (np.empty((n, 0), np.float32),) * 2
    boundary = np.ones(x.shape, dtype=np.float32)
    boundary[1:-1] = (x[1:-1] != x[:-2]) | (x[1:-1] != x[2:])
    f_t -= f_r
    np.abs(f_t, out=f_t)
    f_t *= boundary
    return f_t.max(axis=0), at_edges


def _ordered_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> uint32 whose unsigned order is the floats' order (sign bit flipped, negatives inverted)."""
    bits = values.view(np.uint32)
    negative = (values.view(np.int32) >> 31).view(np.uint32)  # all ones where negative
    return bits ^ (negative | np.uint32(1 << 31))


def _from_ordered_bits(ordered: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_ordered_bits`."""
    positive = (ordered.view(np.int32) >> 31).view(np.uint32)  # all ones where the top bit is set
    return (ordered ^ (~positive | np.uint32(1 << 31))).view(np.float32)


def _interpolated_cdf(
    x: np.ndarray, level: np.ndarray, mine: np.ndarray, low: np.ndarray, high: np.ndarray
) -> np.ndarray:
    """One distribution's CDF at every merged position (axis 0), from its own knots.

    ``mine`` is 1.0 at this distribution's knots and 0.0 elsewhere: exact
    arithmetic blends, several times faster than ``np.where`` here.
    """
    other = 1 - mine
    own_x = mine * x
    prev_x = own_x + other * low
    next_x = own_x + other * high
    prev_level = mine * level
    next_level = prev_level + other
    _fill_forward(prev_x, np.maximum)
    _fill_forward(prev_level, np.maximum)
    _fill_forward(next_x[::-1], np.minimum)
    _fill_forward(next_level[::-1], np.minimum)
    next_x -= prev_x
    np.maximum(next_x, np.float32(1e-30), out=next_x)  # the gap; 0 only where x == prev_x
    next_level -= prev_level
    x = x - prev_x
    x /= next_x
    x *= next_level
    x += prev_level
    return x


def _fill_forward(a: np.ndarray, op: np.ufunc) -> None:
    """In place ``op.accumulate`` along axis 0: a loop over the knots, each step n rows wide.

    (numpy's own ``accumulate`` along an axis is many times slower for this shape.)
    """
    for i in range(1, a.shape[0]):
        op(a[i], a[i - 1], out=a[i])
