"""The design issue 23 proposed, measured: per-channel reductions computed inside the compiled graph.

covshift records compiled models by relaying each layer input out of the graph
to its eager summarizer (`covshift::relay`, docs/guide.md "Compiled models").
Issue 23 proposed instead to accumulate the statistics *inside* the graph, with
traceable code that inductor fuses into the kernels producing the layer inputs,
and an on/off flag that is a tensor, so one graph serves recorded and
unrecorded steps. This script measures that design's core on the reference CNN
before anyone builds it: the per-channel sum, sum of squares, min and max of
each instrumented layer's input (the four reductions covshift's moments and
extrema need; no sample, no quantiles, no storage), written to buffers by a
forward pre-hook that dynamo traces into the graph:

- "in-graph, always": the reductions at every step (a flag as a plain multiply
  would still compute them);
- "in-graph, cond on" / "cond off": under `torch.cond` on a one-element CPU
  flag tensor, set between steps (no recompilation: tensor values are not
  guarded), at recorded and at unrecorded steps. These two are compiled with
  inductor's layout optimization off: where it makes a layer input channels-last,
  its code for the cond branch asserts the eager layout and fails (torch 2.14.1;
  `.contiguous()` on the operand does not help, it is a no-op when traced); so
  is a copy of the model without hooks, their baseline.

Beside them, in the same rounds, covshift as it records compiled models today:
every=1 (reductions, sample, finalize, storage) and hooks that never record.
All are compiled once with the default backend (inductor, caches off), then
their steps interleaved in a shuffled order, round by round.

    .venv/bin/python -W ignore benchmarks/in_graph.py --rounds 8 --steps 30
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import covshift
from overhead import Compiled, interleaved_times, workload  # benchmarks/overhead.py, next to this script


def _reductions(x: torch.Tensor) -> torch.Tensor:
    """(C, 4): per-channel sum, sum of squares, min and max of ``x`` (channels on dim 1)."""
    dims = [d for d in range(x.dim()) if d != 1]
    return torch.stack([x.sum(dims), (x * x).sum(dims), x.amin(dims), x.amax(dims)], dim=1)


class InGraph(Compiled):
    """A compiled copy of ``model`` whose instrumented layers write their inputs' reductions to buffers
    inside the graph: ``"always"``, ``"cond"`` (under ``torch.cond`` on :attr:`flag`, set to ``on``) or
    not at all (None)."""

    def __init__(self, model: nn.Module, mode: str | None, on: bool = True, layout_optimization: bool = True) -> None:
        self.model, self.tracker = copy.deepcopy(model), None
        self.flag = torch.tensor(on)
        if mode is not None:
            for layer in covshift.record.layers.select_layers(self.model).values():
                channels = getattr(layer, "in_channels", None) or layer.in_features
                layer.register_buffer("covshift_reductions", torch.zeros(channels, 4), persistent=False)
                layer.register_forward_pre_hook(self._hook(mode == "cond"))
        # options: a backend of its own, so dynamo compiles this copy instead of reusing a twin's code
        self.forward = torch.compile(self.model, options={"layout_optimization": layout_optimization})
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def _hook(self, gated: bool):
        flag = self.flag

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if gated:
                reductions = torch.cond(flag, _reductions, lambda t: t.new_zeros(t.shape[1], 4), (x,))
            else:
                reductions = _reductions(x)
            module.covshift_reductions.copy_(reductions)

        return hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default 8)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per config per round (default 30)")
    args = parser.parse_args()
    import torch._inductor.config

    torch._inductor.config.force_disable_caches = True
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    model, batches, described = workload("cnn", None, args.steps)
    makers = {
        "compiled, no hooks": lambda: Compiled(model, None),
        "no hooks, layout opt. off": lambda: InGraph(model, None, layout_optimization=False),
        "in-graph, always": lambda: InGraph(model, "always"),
        "in-graph, cond on": lambda: InGraph(model, "cond", on=True, layout_optimization=False),
        "in-graph, cond off": lambda: InGraph(model, "cond", on=False, layout_optimization=False),
        "covshift every=1 (relay)": lambda: Compiled(model, {"every": 1}),
        "covshift never recording": lambda: Compiled(model, {"every": 10**9}),
    }
    runs, compile_seconds = {}, {}
    for name, make in makers.items():
        runs[name] = make()
    for name, run in runs.items():
        compile_seconds[name] = run.step(*batches[0])
        for x, y in batches[1:3]:
            run.step(x, y)
    for name in ("in-graph, cond on", "in-graph, cond off"):  # one graph serves both values of the flag
        flag = runs[name].flag
        with torch._dynamo.config.patch(error_on_recompile=True):
            flag.fill_(not bool(flag))
            runs[name].step(*batches[0])
            flag.fill_(not bool(flag))
    times = interleaved_times(runs, batches, args.rounds)
    print(f"{described}, torch.compile (default backend), {args.rounds} rounds x {args.steps} steps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'config':<27} {'step (ms)':>10} {'ratio':>7} {'ratio IQR':>15} {'first step (s)':>15}")
    base = times["compiled, no hooks"]
    for name, values in times.items():
        ratios = [value / b for value, b in zip(values, base)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(f"{name:<27} {statistics.median(values) * 1e3:>10.2f} {statistics.median(ratios):>6.3f}x "
              f"{q1:>6.3f}-{q3:.3f}x {compile_seconds[name]:>15.1f}")


if __name__ == "__main__":
    main()
