"""Cost of recording: training-step time with covshift hooks, as a ratio to no hooks.

Interleaves, in one process and in shuffled order each round, the training steps
of the reference MNIST CNN (batch 128) with: no hooks; covshift every=1; covshift
with its defaults (every=10); covshift hooks that never record (their fixed cost);
a naive hook (torch.var_mean + torch.quantile per layer).
Each round times a block of steps per configuration, covshift's flush at
`detach()` included (summaries are finalized and written there), and prints the
median over rounds of the time per step and its ratio to the un-instrumented step.

    .venv/bin/python benchmarks/overhead.py --rounds 12 --steps 30
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

import covshift
from covshift.experiments.models import reference_pair
from covshift.summary import QUANTILE_LEVELS


class NaiveHooks(AbstractContextManager):
    """What a first attempt looks like: var_mean and torch.quantile on every layer input."""

    def __init__(self, model: nn.Module) -> None:
        self.handles = [
            module.register_forward_pre_hook(self._hook)
            for module in model.modules()
            if covshift.layers.is_default_layer(module) and module is not model
        ]
        self.levels = torch.tensor(QUANTILE_LEVELS)
        self.kept: list[torch.Tensor] = []

    def _hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
        var, mean = torch.var_mean(per_channel, dim=1)
        self.kept.append(torch.quantile(per_channel, self.levels, dim=1))

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def time_steps(model: nn.Module, batches: list, recorder: Callable[[], AbstractContextManager]) -> float:
    """Seconds per training step with the recorder attached, its final flush included."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    with recorder():
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds (default 12)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per config per round (default 30)")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, _ = reference_pair(seed=0)
    batches = [
        (torch.rand(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,)))
        for _ in range(args.steps)
    ]
    configs: dict[str, Callable[[], AbstractContextManager]] = {
        "no hooks": nullcontext,
        "covshift every=1": lambda: covshift.attach(model, every=1),
        "covshift defaults": lambda: covshift.attach(model),
        "covshift never recording": lambda: covshift.attach(model, every=10**9),
        "naive var_mean+quantile": lambda: NaiveHooks(model),
    }
    layers = len(covshift.layers.select_layers(model))
    samples: dict[str, list[float]] = {name: [] for name in configs}
    time_steps(model, batches, nullcontext)  # warm-up
    for _ in range(args.rounds):
        order = list(configs)
        random.shuffle(order)
        for name in order:
            samples[name].append(time_steps(model, batches, configs[name]))
    base = statistics.median(samples["no hooks"])
    print(f"reference CNN, batch {args.batch_size}, {layers} instrumented layers, "
          f"{args.rounds} rounds x {args.steps} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'config':<26} {'step (ms)':>10} {'ratio':>7}")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:<26} {median * 1e3:>10.2f} {median / base:>6.3f}x")


if __name__ == "__main__":
    main()
