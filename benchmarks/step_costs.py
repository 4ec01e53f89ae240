"""Cost of recording, step by step: plain, idle and recorded training steps.

`overhead.py` times blocks of steps, so each block also pays once-per-run costs
(the first recorded step, the first write of a part and of meta.json), and its
ratios carry this machine's noise of a few percent: about as large as the
whole cost of sparse recording. This script times every training step on its
own, in rounds: a block of steps without hooks and a block of the same steps
with `covshift.attach(model, every=N)` (`--every`, default 10, the default
before the log-spaced schedule) then `detach()`, in random order. Medians of
single steps are robust to the noise and separate what a long run pays per
step from what it pays once. The cost of recording is measured against the
idle steps of the same block (they run interleaved with the recorded ones, so
the machine's drifts cancel); the idle hooks' own cost against the plain block.
From these it prints what a long run pays per step with `every=N` and with the
default log-spaced schedule (which records 88 of the first 1,000 steps and 168
of the first 100,000).

`--breakdown` also times covshift's parts inside the recorded steps (by
wrapping its functions with timers, a few microseconds per call): the
reductions (`Summarizer.summarize` less its sample), the sample, the finalize
of the step (the row sort, and the quantiles, bin means and statistics around
it), the flush when one falls in the step, and the bookkeeping (everything
else covshift's hooks do: step counting, merges, buffering).

`--baseline DIR` adds, each round, a block recorded by the covshift package of
another checkout (see overhead.py), and prints the difference of the two
recording costs within each round: a before/after comparison on the same
machine state.

    .venv/bin/python benchmarks/step_costs.py --rounds 10 --steps 40
    .venv/bin/python benchmarks/step_costs.py --model resnet18 --rounds 6 --steps 20 --every 2 --breakdown
    .venv/bin/python benchmarks/step_costs.py --baseline ../main --every 2 --breakdown
"""

from __future__ import annotations

import argparse
import functools
import importlib
import random
import statistics
import time
import types
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F

import covshift
from covshift.schedule import LogSpaced
from overhead import MODELS, load_baseline, steady_malloc, workload  # benchmarks/overhead.py, next to this script


class Timers:
    """Seconds spent in chosen functions of a covshift package, per part, while installed (patched in place)."""

    #: (part, module, class or None, attribute): the functions timed. A part nested in another is also counted there.
    TIMED = (
        ("summarize", "summary.summarize", "Summarizer", "summarize"),
        ("sample", "summary.summarize", "Summarizer", "_sample"),
        ("finalize", "summary.finalize", None, "finalize"),
        ("sort", "summary.row_statistics", None, "sort_rows"),
        ("sort", "summary.row_statistics", None, "rank_bins"),
        ("flush", "store.writer", "RunWriter", "flush"),
        ("hooks", "record.tracker", "Tracker", "_on_forward_start"),
        ("hooks", "record.tracker", "Tracker", "_on_forward_end"),
        ("hooks", "record.tracker", "Tracker", "_on_optimizer_step"),
        ("hooks", "record.tracker", "Tracker", "_observe"),
        # Where a checkout from before the subpackages (summary/, store/, record/) keeps them:
        ("summarize", "summary", "Summarizer", "summarize"),
        ("sample", "summary", "Summarizer", "_sample"),
        ("finalize", "finalize", None, "finalize"),
        ("sort", "row_statistics", None, "sort_rows"),
        ("sort", "row_statistics", None, "rank_bins"),
        # Where a baseline checkout from before covshift/summary/finalize.py keeps them:
        ("finalize", "summary", None, "finalize"),
        ("sort", "summary", None, "_sort_rows_"),
        ("flush", "run", "Run", "flush"),
        ("hooks", "tracker", "Tracker", "_on_forward_start"),
        ("hooks", "tracker", "Tracker", "_on_forward_end"),
        ("hooks", "tracker", "Tracker", "_on_optimizer_step"),
        ("hooks", "tracker", "Tracker", "_observe"),
    )

    def __init__(self, package: types.ModuleType) -> None:
        self.package = package
        self.seconds: dict[str, float] = defaultdict(float)
        self._saved: list[tuple[object, str, Callable]] = []
        self._depth: dict[str, int] = defaultdict(int)

    def install(self) -> None:
        for part, module, cls, attribute in self.TIMED:
            try:
                owner = importlib.import_module(f"{self.package.__name__}.{module}")
            except ModuleNotFoundError:  # a layout this package does not have
                continue
            owner = getattr(owner, cls, None) if cls else owner
            original = getattr(owner, attribute, None)
            if original is not None:
                self._saved.append((owner, attribute, original))
                setattr(owner, attribute, self._timed(part, original))

    def remove(self) -> None:
        for owner, attribute, original in reversed(self._saved):
            setattr(owner, attribute, original)
        self._saved.clear()

    def _timed(self, part: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            self._depth[part] += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth[part] -= 1
                if not self._depth[part]:  # only the outermost call of a part counts
                    self.seconds[part] += time.perf_counter() - start

        return timed

    def take(self) -> dict[str, float]:
        """Milliseconds per part since the last call, and the derived parts of the breakdown."""
        ms = {part: value * 1e3 for part, value in self.seconds.items()}
        self.seconds.clear()
        summarize, sample, finalize = ms.get("summarize", 0.0), ms.get("sample", 0.0), ms.get("finalize", 0.0)
        sort, flush, hooks = ms.get("sort", 0.0), ms.get("flush", 0.0), ms.get("hooks", 0.0)
        return {
            "reductions": summarize - sample,
            "sample": sample,
            "sort": sort,
            "quantiles, bin means, stats": finalize - sort,
            "flush (in the step)": flush,
            "bookkeeping": hooks - summarize - finalize - flush,
            "covshift in the step, total": hooks,
        }


#: Length of the long runs the log-spaced schedule's average cost is given for.
LONG_RUNS = (1_000, 100_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="cnn", help="the reference CNN (default) or resnet18")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of plain then tracked steps (default 10)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per block (default 40)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 (cnn), 32 (resnet18)")
    parser.add_argument("--every", type=int, default=10, help="the tracked block records every N-th step (default 10)")
    parser.add_argument("--breakdown", action="store_true", help="time covshift's parts in the recorded steps")
    parser.add_argument("--baseline", metavar="DIR", help="also record with the covshift package of the checkout DIR")
    args = parser.parse_args()
    if args.every < 2:
        parser.error("--every must be at least 2: a recorded step's cost is measured against the idle steps between")
    steady_malloc()

    model, batches, described = workload(args.model, args.batch_size, args.steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    packages = {"covshift": covshift, **({"baseline": load_baseline(args.baseline)} if args.baseline else {})}

    def step_ms(x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        return (time.perf_counter() - start) * 1e3

    kinds = ("idle", "recorded", "first recorded", "detach")
    timers = {name: Timers(package) for name, package in packages.items()}
    parts: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in packages}
    times: dict[str, list[float]] = {"plain": [], **{f"{name} {kind}": [] for name in packages for kind in kinds}}
    rounds: list[dict[str, float]] = []
    for x, y in batches[:3]:  # warm-up, lazy imports of the store included
        step_ms(x, y)
    for package in packages.values():
        with package.attach(model, every=1):
            for x, y in batches[:3]:
                step_ms(x, y)
    if args.breakdown:
        for timer in timers.values():
            timer.install()
    for _ in range(args.rounds):
        block: dict[str, list[float]] = {kind: [] for kind in times}

        def plain() -> None:
            block["plain"] += [step_ms(x, y) for x, y in batches]

        def tracked(name: str) -> None:
            tracker = packages[name].attach(model, every=args.every)
            for index, (x, y) in enumerate(batches):
                timers[name].take()
                kind = "first recorded" if index == 0 else "recorded" if tracker.schedule.records(index) else "idle"
                block[f"{name} {kind}"].append(step_ms(x, y))
                if kind == "recorded":
                    for part, ms in timers[name].take().items():
                        parts[name][part].append(ms)
            start = time.perf_counter()
            tracker.detach()
            block[f"{name} detach"].append((time.perf_counter() - start) * 1e3)

        blocks = [plain, *(functools.partial(tracked, name) for name in packages)]
        for run in random.sample(blocks, len(blocks)):
            run()
        for kind, values in block.items():
            times[kind] += values
        rounds.append({kind: statistics.median(values) for kind, values in block.items() if values})
    for timer in timers.values():
        timer.remove()

    plain_ms = statistics.median(times["plain"])
    print(f"{described}, every={args.every}, {args.rounds} rounds x {args.steps} steps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  median {'plain':<24} {plain_ms:8.2f} ms")
    recordings = {}
    for name in packages:
        label = name if name == "covshift" else f"baseline ({args.baseline})"
        print(f"{label}:")
        for kind in kinds:
            print(f"  median {kind:<24} {statistics.median(times[f'{name} {kind}']):8.2f} ms")
        recordings[name] = [r[f"{name} recorded"] - r[f"{name} idle"] for r in rounds]
        recording = statistics.median(recordings[name])
        idle_hooks = statistics.median(r[f"{name} idle"] - r["plain"] for r in rounds)
        print(f"  recording a step (recorded - idle step of the same block, median of rounds): {recording:.2f} ms")
        print(f"  idle hooks (idle step - plain step, median of rounds): {idle_hooks:+.2f} ms")
        long_run = plain_ms + idle_hooks + recording / args.every
        print(f"  long run with every={args.every}, per step: {long_run:.2f} ms = {long_run / plain_ms:.3f}x the plain "
              f"step ({1 + recording / args.every / plain_ms:.3f}x counting the recording alone)")
        for length in LONG_RUNS:
            share = len(LogSpaced().steps(length)) / length
            long_run = plain_ms + idle_hooks + recording * share
            print(f"  the defaults (every='log') over {length:,} steps ({share:.2%} recorded), per step: "
                  f"{long_run:.2f} ms = {long_run / plain_ms:.3f}x ({1 + recording * share / plain_ms:.4f}x "
                  "counting the recording alone)")
        if args.breakdown:
            print(f"  breakdown of a recorded step (median over {len(parts[name]['reductions'])} recorded steps; "
                  "mean in brackets), ms:")
            for part, values in parts[name].items():
                print(f"    {part:<30} {statistics.median(values):8.2f}  ({statistics.fmean(values):.2f})")
    if args.baseline:
        diffs = [new - old for new, old in zip(recordings["covshift"], recordings["baseline"])]
        q1, _, q3 = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else diffs * 3
        print(f"recording a step, covshift - baseline within each round: {statistics.median(diffs):+.2f} ms "
              f"(IQR {q1:+.2f} to {q3:+.2f})")


if __name__ == "__main__":
    main()
