"""One number measured over several seeds: its median, its range and a bootstrap interval of the median.

A factor such as "BN drifts 7.6× less" measured on one seed can be 6.8× or 11.0× on
the next. :func:`seed_spread` states the seeds' median with their minimum and maximum
and a percentile bootstrap interval of the median: ``resamples`` resamples of the
seeds, drawn with replacement from a generator seeded with ``seed`` (so the interval
is the same every time it is computed), and the ``(1 − level) / 2`` and
``(1 + level) / 2`` quantiles of their medians. The interval can only lie between
the seeds' own values, and with few seeds it is wide: with 5 seeds the smallest
value is the median of about 5.8% of the resamples (3 or more of 5 draws), so the
95% interval is the min–max itself; with 9 seeds it is narrower than the range.
:func:`mean_and_error` gives the mean and its standard error, for accuracies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Bootstrap resamples and the seed of their generator, the defaults of every stated interval.
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class SeedSpread:
    """The median over seeds of one number, its min and max, and a bootstrap interval of the median."""

    n: int
    median: float
    low: float  # the bootstrap interval of the median
    high: float
    minimum: float
    maximum: float
    level: float = LEVEL
    resamples: int = RESAMPLES
    seed: int = BOOTSTRAP_SEED

    def describe(self, unit: str = "", digits: int = 2) -> str:
        """The spread in words.

        >>> print(seed_spread([7.6, 6.8, 11.0, 9.0, 8.1]).describe("×", 1))
        median 8.1× over 5 seeds (min–max 6.8–11.0×; 95% percentile bootstrap of the median, 10,000 resamples, seed 0: 6.8–11.0×)
        """
        if self.n == 0:
            return "no seed measured"

        def f(value: float) -> str:
            return f"{value:.{digits}f}"

        if self.n == 1:
            return f"{f(self.median)}{unit} (one seed: no spread)"
        return (f"median {f(self.median)}{unit} over {self.n} seeds (min–max {f(self.minimum)}–{f(self.maximum)}{unit}; "
                f"{self.level:.0%} percentile bootstrap of the median, {self.resamples:,} resamples, seed {self.seed}: "
                f"{f(self.low)}–{f(self.high)}{unit})")

    def as_dict(self) -> dict[str, float | int]:
        """The fields as a JSON-ready dict."""
        return {"n": self.n, "median": self.median, "low": self.low, "high": self.high, "min": self.minimum,
                "max": self.maximum, "level": self.level, "resamples": self.resamples, "seed": self.seed}


def seed_spread(
    values: Sequence[float], *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> SeedSpread:
    """The median of ``values`` (one per seed; NaN left out), their range and a percentile bootstrap interval.

    Args:
        values: the number measured once per seed.
        level: the interval's coverage, in (0, 1).
        resamples: bootstrap resamples of the seeds (with replacement).
        seed: the seed of the resampling generator.

    Raises:
        ValueError: ``level`` outside (0, 1) or ``resamples`` below 1.

    >>> s = seed_spread([1.0, 2.0, 3.0])
    >>> s.median, s.minimum, s.maximum, 1.0 <= s.low <= s.median <= s.high <= 3.0
    (2.0, 1.0, 3.0, True)
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    kept = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if not len(kept):
        nan = math.nan
        return SeedSpread(0, nan, nan, nan, nan, nan, level, resamples, seed)
    rng = np.random.default_rng(seed)
    medians = np.median(kept[rng.integers(0, len(kept), size=(resamples, len(kept)))], axis=1)
    low, high = np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])
    return SeedSpread(len(kept), float(np.median(kept)), float(low), float(high), float(kept.min()),
                      float(kept.max()), level, resamples, seed)


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (sample standard deviation / √n; NaN for one value).

    >>> [round(v, 4) for v in mean_and_error([0.9, 0.92, 0.94])]
    [0.92, 0.0115]
    """
    kept = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if not len(kept):
        return math.nan, math.nan
    error = float(kept.std(ddof=1) / math.sqrt(len(kept))) if len(kept) > 1 else math.nan
    return float(kept.mean()), error
