"""Cost of one gradient-ICS measurement, beside a plain training step, in one run.

Times single SGD steps (forward, backward, optimizer step) of a network without
measurement and the same steps with `covshift.gradients.GradientICS(every=1)`,
alternating in rounds, and prints the medians and their ratio. A measured step
runs k + 1 extra forward/backward passes for k layers with parameters (one for
G, one G' per layer after the first), so the ratio grows with depth; with
`every=N` the average cost per step is 1 + (ratio − 1) / N.

    .venv/bin/python benchmarks/gradient_ics.py --rounds 5 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from covshift.experiments.models import reference_pair
from covshift.science.gradient_ics import GradientICS


def mlp(batchnorm: bool) -> nn.Module:
    """The BatchNorm paper's Figure 1 network: 784-100-100-100-10, sigmoid."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = 784
    for _ in range(3):
        layers.append(nn.Linear(width, 100))
        if batchnorm:
            layers.append(nn.BatchNorm1d(100))
        layers.append(nn.Sigmoid())
        width = 100
    layers.append(nn.Linear(100, 10))
    return nn.Sequential(*layers)


def time_steps(model: nn.Module, measure: bool, steps: int, batch: int) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ics = GradientICS(model, opt, F.cross_entropy, every=1) if measure else None
    times = []
    for _ in range(steps):
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if ics is not None:
            ics.batch(x, y)
        opt.step()
        times.append(time.perf_counter() - start)
    if ics is not None:
        ics.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per block (default 10)")
    args = parser.parse_args()
    torch.manual_seed(0)
    plain_cnn, bn_cnn = reference_pair(seed=0)
    cases = [
        ("MLP 784-100-100-100-10, batch 60", mlp(False), 60),
        ("MLP + BN, batch 60", mlp(True), 60),
        ("reference CNN, batch 128", plain_cnn, 128),
        ("reference CNN + BN, batch 128", bn_cnn, 128),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rounds {args.rounds} × {args.steps} steps")
    print(f"{'network':34} {'layers':>6} {'plain ms':>9} {'measured ms':>12} {'ratio':>6}")
    for name, model, batch in cases:
        layers = len(GradientICS(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy).layers)
        plain, measured = [], []
        time_steps(model, True, 2, batch)  # warm up
        for _ in range(args.rounds):
            plain += time_steps(model, False, args.steps, batch)
            measured += time_steps(model, True, args.steps, batch)
        p, m = statistics.median(plain) * 1e3, statistics.median(measured) * 1e3
        print(f"{name:34} {layers:>6} {p:>9.2f} {m:>12.2f} {m / p:>6.1f}")


if __name__ == "__main__":
    main()
