"""Cost of covshift's defaults, step by step: plain, idle and recorded training steps.

`overhead.py` times blocks of steps, so each block also pays once-per-run costs
(the first recorded step, the first write of a part and of meta.json), and its
ratios carry this machine's noise of a few percent: about as large as the
whole cost of the defaults. This script times every training step on its own,
in rounds: a block of steps without hooks and a block of the same steps with
`covshift.attach(model)` (every=10) then `detach()`, in random order. Medians
of single steps are robust to the noise and separate what a long run pays per
step from what it pays once. The cost of recording is measured against the
idle steps of the same block (they run interleaved with the recorded ones, so
the machine's drifts cancel); the idle hooks' own cost against the plain block.

    .venv/bin/python benchmarks/step_costs.py --rounds 10 --steps 40
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

import covshift
import covshift.tracker
from covshift.experiments.models import reference_pair
from overhead import steady_malloc  # benchmarks/overhead.py, next to this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="rounds of plain then tracked steps (default 10)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per block (default 40)")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    steady_malloc()

    torch.manual_seed(0)
    model, _ = reference_pair(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = [
        (torch.rand(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,)))
        for _ in range(args.steps)
    ]

    def step_ms(x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        return (time.perf_counter() - start) * 1e3

    times: dict[str, list[float]] = {"plain": [], "idle": [], "recorded": [], "first recorded": [], "detach": []}
    rounds: list[dict[str, float]] = []
    for x, y in batches:  # warm-up
        step_ms(x, y)
    for _ in range(args.rounds):
        block: dict[str, list[float]] = {kind: [] for kind in times}

        def plain() -> None:
            block["plain"] += [step_ms(x, y) for x, y in batches]

        def tracked() -> None:
            tracker = covshift.attach(model)
            for index, (x, y) in enumerate(batches):
                kind = "first recorded" if index == 0 else "recorded" if tracker.schedule.records(index) else "idle"
                block[kind].append(step_ms(x, y))
            start = time.perf_counter()
            tracker.detach()
            block["detach"].append((time.perf_counter() - start) * 1e3)

        for run in random.sample([plain, tracked], 2):
            run()
        for kind, values in block.items():
            times[kind] += values
        rounds.append({kind: statistics.median(values) for kind, values in block.items()})

    every = covshift.tracker.DEFAULT_EVERY
    recording = statistics.median(r["recorded"] - r["idle"] for r in rounds)
    idle_hooks = statistics.median(r["idle"] - r["plain"] for r in rounds)
    plain_ms = statistics.median(times["plain"])
    print(f"reference CNN, batch {args.batch_size}, defaults (every={every}), {args.rounds} rounds x "
          f"{args.steps} steps, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for kind, values in times.items():
        print(f"  median {kind:<15} {statistics.median(values):8.2f} ms")
    print(f"recording a step (recorded - idle step of the same block, median of rounds): {recording:.2f} ms")
    print(f"idle hooks (idle step - plain step, median of rounds): {idle_hooks:+.2f} ms")
    long_run = plain_ms + idle_hooks + recording / every
    print(f"long run with the defaults, per step: {long_run:.2f} ms = {long_run / plain_ms:.3f}x the plain step "
          f"({1 + recording / every / plain_ms:.3f}x counting the recording alone)")

if __name__ == "__main__":
    main()
