"""covshift.metrics: reference values, exact piecewise-linear results and invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

from covshift.metrics import formulas as m

LEVELS = np.linspace(0.0, 1.0, 33).astype(np.float32)


def knots_of(samples: np.ndarray, levels: np.ndarray = LEVELS) -> np.ndarray:
    """Quantile-function knots of each row of ``samples`` (min at level 0, max at 1)."""
    return np.quantile(samples, levels, axis=-1).T.astype(np.float32)


def brute_ks(a: np.ndarray, b: np.ndarray, levels: np.ndarray) -> float:
    """KS of two continuous piecewise-linear quantile functions: both CDFs at every knot."""
    xs = np.union1d(a, b)
    return float(np.abs(np.interp(xs, a, levels) - np.interp(xs, b, levels)).max())


def test_ks_is_exact_for_piecewise_linear_quantile_functions():
    rng = np.random.default_rng(0)
    levels = np.r_[0.0, np.sort(rng.uniform(0.01, 0.99, 20)), 1.0].astype(np.float32)
    a = np.sort(rng.normal(size=(300, 22)), axis=1).astype(np.float32)
    b = np.sort(rng.normal(0.4, 1.5, size=(300, 22)), axis=1).astype(np.float32)
    expected = [brute_ks(x.astype(float), y.astype(float), levels.astype(float)) for x, y in zip(a, b)]
    np.testing.assert_allclose(m.ks(a, b, levels), expected, atol=1e-6)


@pytest.mark.parametrize(
    "make_a, make_b",
    [
        (lambda r, n: r.normal(size=n), lambda r, n: r.normal(0.3, 1.2, n)),
        (lambda r, n: np.maximum(r.normal(size=n), 0), lambda r, n: np.maximum(r.normal(0.2, 1, n), 0)),
        (lambda r, n: np.maximum(r.normal(size=n), 0), lambda r, n: r.normal(0.5, 1, n)),  # atom vs none
        (lambda r, n: np.zeros(n), lambda r, n: r.uniform(-1, 1, n)),  # a point mass
    ],
    ids=["normal", "relu-vs-relu", "relu-vs-normal", "point-mass"],
)
def test_ks_from_quantiles_matches_scipy_ks_2samp(make_a, make_b):
    rng = np.random.default_rng(1)
    a, b = make_a(rng, 20000), make_b(rng, 20000)
    levels = np.linspace(0, 1, 129)
    got = m.ks(knots_of(a, levels)[None], knots_of(b, levels)[None], levels)[0]
    assert got == pytest.approx(ks_2samp(a, b).statistic, abs=0.01)
    # ... and from both sides of a jump: the same value with the roles swapped.
    assert m.ks(knots_of(b, levels)[None], knots_of(a, levels)[None], levels)[0] == pytest.approx(got, abs=1e-6)


def test_psi_and_js_match_their_definitions_on_reference_deciles():
    rng = np.random.default_rng(2)
    ref, cur = rng.normal(size=50000), rng.normal(0.4, 1.3, 50000)
    levels = np.linspace(0, 1, 257)
    edges = np.quantile(ref, np.arange(1, 10) / 10)
    p_cur = np.diff(np.r_[0, np.searchsorted(np.sort(cur), edges, side="right"), len(cur)]) / len(cur)
    p_ref = np.full(10, 0.1)
    found = m.cdf_metrics(knots_of(cur, levels)[None], knots_of(ref, levels)[None], levels)
    a, b = np.maximum(p_cur, m.PSI_EPSILON), np.maximum(p_ref, m.PSI_EPSILON)
    assert found["psi"][0] == pytest.approx(np.sum((a - b) * np.log(a / b)), rel=0.01)
    assert found["js"][0] == pytest.approx(jensenshannon(p_cur, p_ref), rel=0.01)


def test_psi_of_disjoint_distributions_uses_the_epsilon_floor():
    levels = np.array([0.0, 0.5, 1.0], dtype=np.float32)
    found = m.cdf_metrics(np.array([[10.0, 11.0, 12.0]]), np.array([[0.0, 1.0, 2.0]]), levels)
    # All current mass in the top bin: one bin at 1 vs 0.1, nine at epsilon vs 0.1.
    expected = (1 - 0.1) * np.log(1 / 0.1) + 9 * (m.PSI_EPSILON - 0.1) * np.log(m.PSI_EPSILON / 0.1)
    assert found["psi"][0] == pytest.approx(expected, rel=1e-5)
    assert found["ks"][0] == pytest.approx(1.0)
    assert found["js"][0] == pytest.approx(jensenshannon(np.r_[np.zeros(9), 1.0], np.full(10, 0.1)), rel=1e-5)


def test_moment_metrics_by_hand():
    assert m.mean_shift(np.array([3.0]), np.array([1.0]), np.array([4.0]))[0] == 0.5
    assert m.mean_shift(np.array([3.0]), np.array([1.0]))[0] == 2.0
    assert m.std_ratio(np.array([1.0]), np.array([np.e]))[0] == pytest.approx(1.0)
    assert np.isnan(m.std_ratio(np.array([0.0]), np.array([1.0]))[0])
    assert m.gaussian_w2(np.array([3.0]), np.array([6.0]), np.array([0.0]), np.array([2.0]))[0] == 2.5


def test_wasserstein_of_a_shift_is_the_shift():
    bins = np.sort(np.random.default_rng(3).normal(size=(4, 32)), axis=1)
    np.testing.assert_allclose(m.wasserstein(bins + 0.7, bins), 0.7)
    np.testing.assert_allclose(m.wasserstein(bins + 0.7, bins, np.full(4, 2.0)), 0.35)


def test_cdf_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match=r"which must name metrics among .*'kl'"):
        m.cdf_metrics(np.zeros((1, 3)), np.zeros((1, 3)), np.array([0, 0.5, 1]), ["kl"])
    with pytest.raises(ValueError, match=r"must be \(N, K\), \(N, K\) and \(K,\)"):
        m.cdf_metrics(np.zeros((1, 3)), np.zeros((1, 4)), np.array([0, 0.5, 1]))


# -- properties -----------------------------------------------------------------------
# Rows of 33 increasing knots, 10 apart or more, so that no row is constant and float32
# rounding of a scale-and-shift cannot create or break ties.
sorted_rows = arrays(
    np.float64, (3, 33), elements=st.floats(-100, 100, allow_nan=False, allow_subnormal=False)
).map(lambda a: np.sort(a, axis=1).astype(np.float32) + np.arange(33, dtype=np.float32) * 10)


def all_metrics(t: np.ndarray, r: np.ndarray, normalize: bool = True) -> dict[str, np.ndarray]:
    """Every metric of row pairs given as knots (moments and bin means taken from the knots)."""
    mu_t, mu_r, sd_t, sd_r = t.mean(1), r.mean(1), t.std(1), r.std(1)
    scale = sd_r if normalize else None
    out = {
        "mean_shift": m.mean_shift(mu_t, mu_r, scale),
        "std_ratio": m.std_ratio(sd_t, sd_r),
        "wasserstein": m.wasserstein(t[:, :32], r[:, :32], scale),
        "gaussian_w2": m.gaussian_w2(mu_t, sd_t, mu_r, sd_r, normalize),
    }
    out.update(m.cdf_metrics(t, r, LEVELS))
    return out


@settings(max_examples=25, deadline=None)
@given(sorted_rows)
def test_every_metric_is_zero_for_identical_inputs(rows):
    for name, value in all_metrics(rows, rows).items():
        np.testing.assert_allclose(value, 0.0, atol=1e-12, err_msg=name)


@settings(max_examples=25, deadline=None)
@given(sorted_rows, sorted_rows)
def test_symmetric_metrics_are_symmetric(a, b):
    forward, backward = all_metrics(a, b, normalize=False), all_metrics(b, a, normalize=False)
    # (JS is left out: its bins are cut at the reference's deciles, so swapping the roles moves them.)
    for name in ("mean_shift", "std_ratio", "wasserstein", "gaussian_w2", "ks"):
        np.testing.assert_allclose(forward[name], backward[name], rtol=1e-5, atol=1e-6, err_msg=name)


@settings(max_examples=25, deadline=None)
@given(sorted_rows, sorted_rows, st.floats(0.01, 100), st.floats(-50, 50))
def test_normalized_metrics_ignore_a_common_scale_and_shift(a, b, scale, shift):
    before = all_metrics(a, b)
    after = all_metrics(a * np.float32(scale) + np.float32(shift), b * np.float32(scale) + np.float32(shift))
    for name, value in before.items():
        np.testing.assert_allclose(after[name], value, rtol=2e-3, atol=2e-4, err_msg=name)
