"""What a stored record holds per channel: statistic names, quantile levels, bin count.

Kept apart from the hot path (:mod:`covshift.summary.summarize`, which needs torch) so that
reading a run needs only numpy, pandas and pyarrow.
"""

from __future__ import annotations

#: Quantile levels stored per channel: an even grid of 1/32 steps (fine enough
#: for the quantile function) plus the tails and the BatchNorm paper's 15/85.
QUANTILE_LEVELS: tuple[float, ...] = tuple(
    sorted({k / 32 for k in range(1, 32)} | {0.01, 0.05, 0.15, 0.85, 0.95, 0.99})
)
#: Equal-mass bins of the sorted sample whose means are stored: with them the
#: Wasserstein-1 distance is exact up to crossings of two quantile functions
#: inside one bin.
N_BINS = 32

#: Sources a record can come from: training batches, the probe batch, its two halves, and the
#: gradients of the loss with respect to the training batches' layer inputs.
SOURCES = ("train", "probe", "probe_a", "probe_b", "grad")

STAT_NAMES = ("count", "mean", "var", "min", "max", "nonfinite", "zero_frac")

#: stats() columns of the quantiles (``q0.01`` … ``q0.99``) and of the bin means.
QUANTILE_COLUMNS: tuple[str, ...] = tuple(f"q{level:g}" for level in QUANTILE_LEVELS)
BINMEAN_COLUMNS: tuple[str, ...] = tuple(f"binmean_{k:02d}" for k in range(N_BINS))
