"""How often pure sampling noise exceeds NullFloor's 95 % floor, per run, by reference.

A network that does not learn (learning rate 0) on i.i.d. batches has no
covariate shift: its hidden layers' drift is sampling noise alone, so it should
exceed the 95th percentile of the null about 5 % of the time. For each seed,
with and without BatchNorm, this prints the smallest and largest exceedance over
the seven metrics, with the reference ``previous`` (step to step: each pair two
fresh batches, as the null's pairs are) and ``initial`` (every step against
the same first batch: one draw shared by all the steps of a run).

    .venv/bin/python benchmarks/null_calibration.py --seeds 5
"""

from __future__ import annotations

import argparse
import warnings

import pandas as pd
import torch
from torch import nn

import covshift
from covshift.noise import NullFloor, drift_to_null


def stationary_run(seed: int, batchnorm: bool, steps: int = 200, batch: int = 32) -> covshift.Run:
    """A run of a network that does not learn on i.i.d. batches, with a NullFloor every 50 steps."""
    torch.manual_seed(seed)
    layers = [nn.Linear(10, 32), *([nn.BatchNorm1d(32)] if batchnorm else []), nn.ReLU(), nn.Linear(32, 32),
              nn.ReLU(), nn.Linear(32, 3)]
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(100 + seed)
    probe = torch.randn(256, 10, generator=gen)
    with covshift.attach(model, optimizer=opt, every=1) as tracker:
        tracker.add(NullFloor(model, probe, optimizer=opt, every=50, size=batch, splits=50))
        for _ in range(steps):
            model(torch.randn(batch, 10, generator=gen)).sum().backward()
            opt.step()
            opt.zero_grad()
    return tracker.run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="runs per network (default 5)")
    args = parser.parse_args()
    warnings.simplefilter("ignore", covshift.faults.CovshiftWarning)
    rows = []
    for batchnorm in (False, True):
        for seed in range(args.seeds):
            run = stationary_run(seed, batchnorm)
            for reference in ("previous", "initial"):
                exceeds = drift_to_null(run, run.table("null_floor"), metric="all", reference=reference)
                per_metric = exceeds.groupby("metric")["exceeds"].mean()
                rows.append({"reference": reference, "network": "batchnorm" if batchnorm else "plain", "seed": seed,
                             "lowest": per_metric.min(), "highest": per_metric.max()})
    table = pd.DataFrame(rows).sort_values(["reference", "network", "seed"])
    print("exceedance of the null's 95th percentile per run (over the 7 metrics: lowest, highest)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1%}"))


if __name__ == "__main__":
    main()
