"""Accuracy of covshift's drift metrics against scipy on raw activations.

Records, through the real hook path (``nn.Linear(5, 2)`` fed ``(60000, 5)``
inputs, one column per distribution: normal, uniform, ReLU-rectified, Student t
with 3 d.o.f., bimodal), a reference step and a step scaled by 1.2 and shifted by
0.25, for several seeds, and compares ``covshift.drift(..., by="channel")`` with:
``scipy.stats.wasserstein_distance`` (W1), ``scipy.stats.ks_2samp`` (KS), and
PSI / ``scipy.spatial.distance.jensenshannon`` over the reference's deciles of the
raw values. Once with exact summaries (``sample_size=60000``), once with the
default ``sample_size=1024``; also prints the W1 between two independent
1024-value samples of the reference distribution (the sampling noise at that size).

    .venv/bin/python benchmarks/drift_accuracy.py --seeds 10
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp, wasserstein_distance

import covshift
from covshift.metrics.formulas import PSI_EPSILON

N = 60000
KINDS = ("normal", "uniform", "relu", "student_t3", "bimodal")


def draw(rng: np.random.Generator) -> np.ndarray:
    bimodal = np.where(rng.random(N) < 0.5, rng.normal(-2, 0.5, N), rng.normal(2, 0.5, N))
    columns = [rng.standard_normal(N), rng.uniform(-1, 1, N), np.maximum(rng.standard_normal(N), 0),
               rng.standard_t(3, N), bimodal]
    return np.stack(columns, axis=1).astype(np.float32)


def covshift_values(x0: np.ndarray, x1: np.ndarray, sample_size: int) -> pd.DataFrame:
    model = torch.nn.Linear(5, 2)
    with covshift.attach(model, every=1, sample_size=sample_size) as tracker:
        model(torch.from_numpy(x0))
        model(torch.from_numpy(x1))
    frame = covshift.drift(tracker.run, ["wasserstein", "ks", "psi", "js"], normalize=False, by="channel")
    return frame[frame["step"] == 1].pivot_table(index="channel", columns="metric", values="value")


def scipy_values(cur: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    edges = np.quantile(ref, np.arange(1, 10) / 10)
    def probabilities(x: np.ndarray) -> np.ndarray:
        return np.diff(np.r_[0, np.searchsorted(np.sort(x), edges, side="right"), len(x)]) / len(x)
    p, q = probabilities(cur), probabilities(ref)
    a, b = np.maximum(p, PSI_EPSILON), np.maximum(q, PSI_EPSILON)
    return {
        "wasserstein": wasserstein_distance(cur, ref),
        "ks": ks_2samp(cur, ref).statistic,
        "psi": float(np.sum((a - b) * np.log(a / b))),
        "js": float(jensenshannon(p, q)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        x0, x1 = draw(rng), (1.2 * draw(rng) + 0.25).astype(np.float32)
        exact, sampled = covshift_values(x0, x1, N), covshift_values(x0, x1, 1024)
        for c, kind in enumerate(KINDS):
            sd = float(x0[:, c].std())
            truth = scipy_values(x1[:, c], x0[:, c])
            halves = rng.choice(x0[:, c], 2048, replace=False)
            floor = wasserstein_distance(halves[:1024], halves[1024:]) / sd
            for metric, value in truth.items():
                rows.append({"seed": seed, "kind": kind, "metric": metric, "scipy": value,
                             "exact": exact.loc[c, metric], "sampled": sampled.loc[c, metric],
                             "sd": sd, "w1_two_1024_samples": floor})
    frame = pd.DataFrame(rows)
    frame["exact_rel_err"] = (frame["exact"] - frame["scipy"]).abs() / frame["scipy"]
    frame["exact_abs_err"] = (frame["exact"] - frame["scipy"]).abs()
    frame["sampled_abs_err_sd"] = (frame["sampled"] - frame["scipy"]).abs() / frame["sd"]
    pd.set_option("display.width", 200)
    print(f"exact summaries (sample_size={N}), {args.seeds} seeds: max error per metric and distribution")
    print(frame.pivot_table(index="kind", columns="metric", values="exact_rel_err", aggfunc="max")
          .rename(columns=lambda c: f"{c} rel").round(4).to_string())
    print(frame.pivot_table(index="kind", columns="metric", values="exact_abs_err", aggfunc="max")
          .rename(columns=lambda c: f"{c} abs").round(4).to_string())
    w1 = frame[frame["metric"] == "wasserstein"]
    print(f"\nW1 with the default sample_size=1024: |error| / sigma_ref over {args.seeds} seeds")
    print(w1.groupby("kind").agg(
        w1_over_sd=("scipy", lambda s: float((s / w1.loc[s.index, "sd"]).mean())),
        err_median=("sampled_abs_err_sd", "median"),
        err_max=("sampled_abs_err_sd", "max"),
        w1_two_1024_samples_median=("w1_two_1024_samples", "median"),
    ).round(3).to_string())


if __name__ == "__main__":
    main()
