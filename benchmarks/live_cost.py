"""What live alerts and live logging add to training at the default schedule: time inside them over a run.

Block timings (``overhead.py``) cannot resolve a cost of 1 % on this machine
(blocks of the same configuration vary by 10 %), so this script times the live
side itself: it trains the reference CNN for ``--steps`` steps with covshift's
defaults (the log-spaced schedule, densest at the start of a run), alerts on
(``on_alert``) and a live TensorBoard log (``tensorboard=``), and adds up the
seconds spent checking each recorded step for alerts, storing them and writing
the live log (everything the live side runs; at unrecorded steps it runs
nothing). It prints that time as a share of the whole run's time.

    .venv/bin/python benchmarks/live_cost.py --steps 1000
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

import covshift
from covshift.experiments.models import reference_pair
from covshift.record.steps import StepWriter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    parser.add_argument("--batch-size", type=int, default=64, help="default 64")
    args = parser.parse_args()

    spent = [0.0]
    check = StepWriter._check_alerts

    def timed_check(self: StepWriter, finalized: object) -> None:
        start = time.perf_counter()
        try:
            check(self, finalized)
        finally:
            spent[0] += time.perf_counter() - start

    StepWriter._check_alerts = timed_check
    torch.manual_seed(0)
    model, _ = reference_pair(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = [(torch.rand(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,))) for _ in range(20)]
    alerts = []
    with tempfile.TemporaryDirectory() as logdir:
        tracker = covshift.attach(model, optimizer=optimizer, on_alert=alerts.append, tensorboard=logdir)
        start = time.perf_counter()
        for step in range(args.steps):
            x, y = batches[step % len(batches)]
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        run = tracker.detach()
        total = time.perf_counter() - start
    recorded = int(run.sources().loc["train", "steps"])
    print(f"reference CNN, batch {args.batch_size}, {args.steps} steps with covshift's defaults, alerts and a "
          f"live TensorBoard log; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"recorded steps: {recorded} of {args.steps}; alerts raised: {len(alerts)}")
    print(f"whole run: {total:.2f} s ({total / args.steps * 1e3:.2f} ms per step)")
    print(f"alerts and live log: {spent[0]:.3f} s = {spent[0] / total:.2%} of the run, "
          f"{spent[0] / max(recorded, 1) * 1e3:.2f} ms per recorded step")


if __name__ == "__main__":
    main()
