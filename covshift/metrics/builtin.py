"""covshift's own drift metrics, each declared once: the formulas of :mod:`covshift.metrics.formulas`
with their labels, glossary lines and thresholds (docs/metrics.md)."""

from __future__ import annotations

import numpy as np

from covshift.metrics import formulas
from covshift.metrics.registry import Metric, Pair, declare_builtin


def _cdf(pair: Pair, name: str) -> np.ndarray:
    """KS, PSI or JS: the ones of this call computed together, once, from the two quantile functions."""
    if "cdf" not in pair.shared:
        which = [n for n in formulas.CDF_METRICS if n in pair.requested] or [name]
        pair.shared["cdf"] = formulas.cdf_metrics(pair.knots, pair.ref_knots, pair.levels, which)
    return pair.shared["cdf"][name]


BUILTIN = (
    Metric("mean_shift", lambda p: formulas.mean_shift(p.mean, p.ref_mean), frozenset({"moments"}),
           "mean shift", "|μ − μ_ref| / σ_ref: how far the channel's mean moved.", scaled=True, threshold=0.8),
    Metric("std_ratio", lambda p: formulas.std_ratio(p.sd, p.ref_sd), frozenset({"moments"}),
           "std ratio |log σ/σ_ref|", "|log(σ / σ_ref)|: how much the channel's spread changed (0.1 ≈ 10%)."),
    Metric("wasserstein", lambda p: formulas.wasserstein(p.binmeans, p.ref_binmeans), frozenset({"moments", "binmeans"}),
           "W1", "the Wasserstein-1 distance: the mean absolute difference between the two distributions' "
           "quantile functions.", scaled=True, threshold=0.1),
    Metric("gaussian_w2", lambda p: formulas.gaussian_w2(p.mean, p.sd, p.ref_mean, p.ref_sd, normalize=False),
           frozenset({"moments"}), "Gaussian W2", "the W2 distance of Gaussians with the two means and SDs.",
           scaled=True),
    Metric("ks", lambda p: _cdf(p, "ks"), frozenset({"moments", "knots"}), "KS statistic",
           "the largest gap between the two cumulative distribution functions (0–1)."),
    Metric("psi", lambda p: _cdf(p, "psi"), frozenset({"moments", "knots"}), "PSI",
           "population stability index over bins cut at the reference's quantiles.", threshold=0.2),
    Metric("js", lambda p: _cdf(p, "js"), frozenset({"moments", "knots"}), "JS divergence",
           "Jensen–Shannon divergence over bins cut at the reference's quantiles.", threshold=0.1),
)

for _metric in BUILTIN:
    declare_builtin(_metric)
