"""Numerical accuracy of each stored summary column, against float64 numpy on the same values.

For float32 inputs ``mean + sd·N(0, 1)`` at growing ratios mean/sd (and for
values near the float32 limit), prints the worst error over channels of each
moment column: the mean's error in units of sd, the variance's relative error,
whether extrema are exact, the exact-mode quantiles' error in units of sd.
Beside them, the relative variance error of the plain float32 formula
``Σx²/n − (Σx/n)²`` that covshift used before (for comparison only).

    .venv/bin/python benchmarks/numerics.py
"""

from __future__ import annotations

import numpy as np
import torch

from covshift.summary.finalize import finalize
from covshift.summary.summarize import QUANTILE_LEVELS, STAT_NAMES, Summarizer

STAT = {name: i for i, name in enumerate(STAT_NAMES)}
SHAPE = (256, 16, 8, 8)  # 16 channels of 16,384 values


def worst_errors(x: torch.Tensor) -> dict[str, float]:
    record = finalize([Summarizer(10**9).summarize(x, 1)])  # exact mode: the sample is every value
    stats = record.stats.numpy()
    ref = x.transpose(0, 1).reshape(x.shape[1], -1).double().numpy()
    sd = ref.std(1)
    total, total_sq = x.sum((0, 2, 3)), x.square().sum((0, 2, 3))  # the plain float32 formula
    n = ref.shape[1]
    naive_var = (total_sq / n - (total / n) ** 2).double().numpy()
    quantiles = np.quantile(ref, QUANTILE_LEVELS, axis=1).T
    return {
        "mean err / sd": float(np.max(np.abs(stats[:, STAT["mean"]] - ref.mean(1)) / sd)),
        "var rel err": float(np.max(np.abs(stats[:, STAT["var"]] / ref.var(1) - 1))),
        "min/max exact": bool(
            (stats[:, STAT["min"]] == ref.min(1)).all() and (stats[:, STAT["max"]] == ref.max(1)).all()
        ),
        "quantile err / sd": float(np.max(np.abs(record.quantiles.numpy() - quantiles) / sd[:, None])),
        "float32 formula var rel err": float(np.max(np.abs(naive_var / ref.var(1) - 1))),
    }


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(SHAPE, generator=generator)
    cases = {f"mean/sd = {ratio:g}": ratio + noise for ratio in (0, 1, 9.9, 10, 1e2, 1e3, 1e4, 1e5)}
    cases["uniform ±1e37"] = (torch.rand(SHAPE, generator=generator) * 2 - 1) * 1e37
    cases["sd 1e20, mean 0"] = noise * 1e20
    rows = {name: worst_errors(x) for name, x in cases.items()}
    columns = list(next(iter(rows.values())))
    print(f"float32 inputs {SHAPE}, dim 1; worst channel of 16")
    print(f"| input | {' | '.join(columns)} |")
    print(f"| --- |{' ---: |' * len(columns)}")
    for name, row in rows.items():
        cells = [str(v) if isinstance(v, bool) else f"{v:.2g}" for v in row.values()]
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
