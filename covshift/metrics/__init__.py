"""Drift metrics: a registry of metrics (:func:`register` adds one), their formulas, and the drift of stored runs.

Layout, from the bottom: ``formulas`` (pure vectorized maths), ``registry`` and
``builtin`` (each metric declared once), ``arrays`` (a run's records as arrays),
``engine`` (records paired with their references, metrics computed in chunks),
``api`` (:func:`covshift.drift` and its siblings), ``verdict`` (two runs compared).
"""

from covshift.metrics import builtin  # noqa: F401 - covshift's own metrics, registered on import
from covshift.metrics.formulas import N_PSI_BINS, PSI_EPSILON, cdf_metrics, gaussian_w2, js, ks, mean_shift, psi, std_ratio, wasserstein
from covshift.metrics.registry import INPUTS, Metric, Pair, get, names, register, unregister

__all__ = [
    "INPUTS", "Metric", "N_PSI_BINS", "PSI_EPSILON", "Pair", "cdf_metrics", "gaussian_w2", "get", "js", "ks",
    "mean_shift", "names", "psi", "register", "std_ratio", "unregister", "wasserstein",
]
