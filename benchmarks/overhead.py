"""Cost of recording: training-step time with covshift hooks, as a ratio to no hooks.

Interleaves, in one process and in shuffled order each round, the training steps
of a model (`--model cnn`: the reference MNIST CNN, batch 128; `--model
resnet18`: torchvision's resnet18, batch 32 of 3x64x64; random data, SGD) with:
no hooks; covshift every=1; covshift every=10 (the default before the
log-spaced schedule); covshift with its defaults (every="log") in the steady
state of a long run (the block runs from step 100,001, where the schedule
records one step in about 5,800: none in the block); covshift hooks that never record
(their fixed cost); every=1 and the defaults with ``gradients=True`` (the input
gradients recorded too) and with ``on_alert=`` (the live checks of each recorded step); a bare hook that computes the sums, extrema and a sorted
1024-value sample and keeps nothing (the issue's lower bound: what covshift
adds beyond it is the cost of storing); a hook that runs only covshift's four
reductions (sum, sum of squares, min, max per channel) and keeps nothing (the
floor of exact moments and extrema without a fused kernel); a naive hook (torch.var_mean +
torch.quantile per layer).
Each round times a block of steps per configuration: `attach()` (once per
training run) is left out, the flush at `detach()` is included (records are
written there). The ratio of each
configuration to the un-instrumented step is taken within each round, so slow
drifts of the machine's speed cancel; the script prints the median time per
step, the median ratio with its interquartile range over rounds, and the page
faults per step.

glibc's malloc returns freed memory at the top of its heap to the system and
maps large blocks afresh, depending on what else is allocated: the same
training step then runs with or without some 40 MB of page faults, a 25%
swing in its time. `--malloc steady` fixes those two thresholds (mallopt), so
every configuration runs with the same allocator behaviour; `--malloc default`
leaves glibc as it is, as in a user's process.

    .venv/bin/python benchmarks/overhead.py --rounds 8 --steps 100 --malloc steady
    .venv/bin/python benchmarks/overhead.py --model resnet18 --rounds 8 --steps 10

`--baseline DIR` also times the covshift package of another checkout (a
worktree of main, say) in the same process, as configurations "baseline …":
a before/after comparison whose rounds see the same machine. This machine's
speed drifts by up to 20% between runs of a few minutes, so comparing two
separate runs says little.

    .venv/bin/python benchmarks/overhead.py --baseline ../main --rounds 10 --steps 30

`--compile` times compiled models instead (torch.compile, the default backend):
the compiled model without covshift against compiled copies of it with covshift
attached (every=1, every=10, the defaults in a long run, never recording; every=1
and the defaults in a long run with ``gradients=True``), each
compiled once before the rounds (its compile time, the first step's, printed,
with inductor's caches off) and kept attached through them. Each step of a
round runs every configuration once in a shuffled order; a round's time ends
with a flush.

    .venv/bin/python benchmarks/overhead.py --compile --rounds 6 --steps 30
"""

from __future__ import annotations

import argparse
import atexit
import copy
import ctypes
import ctypes.util
import functools
import importlib
import random
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
import types

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import covshift
import covshift.record.layers
import covshift.summary.summarize
import covshift.record.tracker
from covshift.experiments.models import reference_pair
from covshift.summary.summarize import QUANTILE_LEVELS

LEVELS = torch.tensor(QUANTILE_LEVELS)


class LayerHooks(AbstractContextManager):
    """Runs ``work`` on the input of every default layer, as a forward pre-hook."""

    def __init__(self, model: nn.Module, work: Callable[[torch.Tensor], object]) -> None:
        self.handles = [
            module.register_forward_pre_hook(lambda module, args: work(args[0].detach()))
            for module in covshift.record.layers.select_layers(model).values()
        ]

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def naive_summary(x: torch.Tensor) -> None:
    """What a first attempt looks like: var_mean and torch.quantile per channel."""
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
    torch.var_mean(per_channel, dim=1)
    torch.quantile(per_channel, LEVELS, dim=1)


@functools.cache
def strided_index(before: int, channels: int, after: int, size: int = 1024) -> torch.Tensor:
    """Flat indices (C, size) of an evenly strided sample of each channel of a (before, C, after) tensor."""
    positions = torch.arange(size) * max(before * after // size, 1) % (before * after)
    return torch.arange(channels)[:, None] * after + ((positions // after) * channels * after + positions % after)


def bare_summary(x: torch.Tensor) -> None:
    """The issue's lower bound: sum, sum of squares, max, min and a sorted strided sample per channel, kept nowhere."""
    view = x.reshape(x.shape[0], x.shape[1], -1)
    view.sum(2).sum(0), (view * view).sum(2).sum(0), view.amax(2).amax(0), view.amin(2).amin(0)
    np.sort(torch.take(view, strided_index(*view.shape)).numpy(), axis=1)


def reductions_only(x: torch.Tensor) -> None:
    """covshift's four passes for per-channel moments and extrema (sum, norm, min, max, each in its faster
    order, the second reduction in float64), kept nowhere: what exact moments cost without a fused kernel."""
    view = x.reshape(x.shape[0], x.shape[1], -1)
    dim = 2 if view.shape[2] >= covshift.summary.summarize._LONG_ROW else 0
    rest = 0 if dim == 2 else 1
    view.sum(dim).sum(rest, dtype=torch.float64)
    torch.linalg.vector_norm(view, dim=2).square_().sum(0, dtype=torch.float64)
    view.amin(dim).amin(rest), view.amax(dim).amax(rest)


def steady_malloc() -> None:
    """Stop glibc from trimming its heap and from mapping blocks under 32 MiB afresh."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_trim_threshold, 2**30) and libc.mallopt(m_mmap_threshold, 2**25)):
        raise SystemExit("mallopt failed: --malloc steady needs glibc")


#: Models of `--model`.
MODELS = ("cnn", "resnet18")
#: The step the steady-state configuration starts at: the log schedule records steps 100,000 and 105,925
#: (one step in about 5,800 there), so a block of up to 5,900 steps from here records none.
LONG_RUN_STEP = 100_001


def workload(name: str, batch_size: int | None, steps: int) -> tuple[nn.Module, list, str]:
    """The model, ``steps`` random batches and a description: the reference CNN or torchvision's resnet18."""
    torch.manual_seed(0)
    if name == "cnn":
        model, _ = reference_pair(seed=0)
        batch_size = batch_size or 128
        shape, classes, label = (1, 28, 28), 10, "reference CNN"
    else:
        import torchvision

        model = torchvision.models.resnet18()
        batch_size = batch_size or 32
        shape, classes, label = (3, 64, 64), 1000, "torchvision resnet18"
    batches = [(torch.rand(batch_size, *shape), torch.randint(0, classes, (batch_size,))) for _ in range(steps)]
    layers = len(covshift.record.layers.select_layers(model))
    return model, batches, f"{label}, batch {batch_size} of {'x'.join(map(str, shape))}, {layers} instrumented layers"


def load_baseline(checkout: str) -> types.ModuleType:
    """The covshift package of another checkout, importable next to this one as ``covshift_baseline``.

    Its files are copied to a temporary directory with their imports of ``covshift`` renamed.
    """
    source = Path(checkout) / "covshift"
    if not (source / "__init__.py").is_file():
        raise SystemExit(f"--baseline {checkout}: no covshift package there")
    root = Path(tempfile.mkdtemp(prefix="covshift-baseline-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    shutil.copytree(source, root / "covshift_baseline", ignore=shutil.ignore_patterns("__pycache__"))
    pattern = re.compile(r"\bcovshift(?=\.[a-z_]|\s+import\b|\s*$)", re.MULTILINE)
    for path in (root / "covshift_baseline").rglob("*.py"):
        path.write_text(pattern.sub("covshift_baseline", path.read_text()))
    sys.path.insert(0, str(root))
    return importlib.import_module("covshift_baseline")


def at_step(tracker: covshift.record.tracker.Tracker, step: int) -> covshift.record.tracker.Tracker:
    """``tracker`` with its next training forward numbered ``step``."""
    tracker.set_step(step)
    return tracker


def baseline_configs(
    package: types.ModuleType, model: nn.Module, sample_size: int
) -> dict[str, Callable[[], AbstractContextManager]]:
    """The recording configurations again, with the baseline package."""
    return {
        "baseline every=1": lambda: package.attach(model, every=1, sample_size=sample_size),
        "baseline every=10": lambda: package.attach(model, every=10, sample_size=sample_size),
        "baseline defaults, long run": lambda: at_step(package.attach(model, sample_size=sample_size), LONG_RUN_STEP),
    }


def time_steps(
    model: nn.Module, batches: list, recorder: Callable[[], AbstractContextManager]
) -> tuple[float, float]:
    """Seconds and minor page faults per training step with the recorder attached, its final flush included."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    attached = recorder()  # attaching happens once per training run: not timed
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    with attached:
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    seconds = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return seconds / len(batches), faults / len(batches)


class Compiled:
    """A compiled copy of ``model`` with its own optimizer, covshift attached with ``settings`` (None: not)."""

    def __init__(self, model: nn.Module, settings: dict | None, long_run: bool = False) -> None:
        self.model = copy.deepcopy(model)
        self.tracker = covshift.attach(self.model, **settings) if settings is not None else None
        if long_run:
            self.tracker.set_step(LONG_RUN_STEP)
        self.forward = torch.compile(self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Seconds of one training step."""
        start = time.perf_counter()
        F.cross_entropy(self.forward(x), y).backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return time.perf_counter() - start

    def flush(self) -> float:
        """Seconds to write what the tracker holds."""
        start = time.perf_counter()
        if self.tracker is not None:
            self.tracker.flush()
        return time.perf_counter() - start


def interleaved_times(runs: dict, batches: list, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each run (``step(x, y)`` and ``flush()``), per round: each step of a round runs
    every run once, in a shuffled order, so the machine's drifts in speed fall on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        spent = dict.fromkeys(runs, 0.0)
        for x, y in batches:
            order = list(runs)
            random.shuffle(order)
            for name in order:
                spent[name] += runs[name].step(x, y)
        for name, run in runs.items():
            times[name].append((spent[name] + run.flush()) / len(batches))
    return times


def compiled_main(args: argparse.Namespace, model: nn.Module, batches: list, described: str) -> None:
    """``--compile``: compiled steps with and without covshift, interleaved step by step; compile times.

    Each step of a round runs every configuration once, in a shuffled order, so that the machine's
    drifts in speed fall on all of them alike; a round's time per configuration ends with its flush.
    Compile times are cold: inductor's caches are off.
    """
    import torch._inductor.config

    torch._inductor.config.force_disable_caches = True
    sample = {"sample_size": args.sample_size}
    plans = {
        "compiled, no hooks": (None, False),
        "compiled + covshift every=1": ({"every": 1, **sample}, False),
        "compiled + covshift every=10": ({"every": 10, **sample}, False),
        "compiled + defaults, long run": (sample, True),
        "compiled + never recording": ({"every": 10**9}, False),
        "compiled + every=1 + gradients": ({"every": 1, "gradients": True, **sample}, False),
        "compiled + defaults + gradients": ({"gradients": True, **sample}, True),
    }
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    runs, compile_seconds = {}, {}
    for name, (settings, long_run) in plans.items():  # attached first: attach() drops code compiled before it
        runs[name] = Compiled(model, settings, long_run)
    for name, run in runs.items():
        compile_seconds[name] = run.step(*batches[0])  # the first step compiles
        for x, y in batches[1:3]:
            run.step(x, y)
    times = interleaved_times(runs, batches, args.rounds)
    recorded = {}
    for name, run in runs.items():
        if run.tracker is not None:
            sources = run.tracker.detach().sources()
            recorded[name] = int(sources.loc["train", "steps"]) if "train" in sources.index else 0
    print(f"{described}, torch.compile (default backend), {args.rounds} rounds x {args.steps} steps, "
          f"sample_size {args.sample_size}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'config':<31} {'step (ms)':>10} {'ratio':>7} {'ratio IQR':>15} {'first step (s)':>15} "
          f"{'recorded steps':>15}")
    base = times["compiled, no hooks"]
    for name, values in times.items():
        ratios = [value / b for value, b in zip(values, base)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(f"{name:<31} {statistics.median(values) * 1e3:>10.2f} {statistics.median(ratios):>6.3f}x "
              f"{q1:>6.3f}-{q3:.3f}x {compile_seconds[name]:>15.1f} {recorded.get(name, '-'):>15}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds (default 12)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per config per round (default 30)")
    parser.add_argument("--model", choices=MODELS, default="cnn", help="the reference CNN (default) or resnet18")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 (cnn), 32 (resnet18)")
    parser.add_argument("--malloc", choices=("steady", "default"), default="steady",
                        help="glibc allocator thresholds: fixed (default) or as glibc sets them")
    parser.add_argument("--sample-size", type=int, default=covshift.summary.summarize.DEFAULT_SAMPLE_SIZE,
                        help="covshift's sample_size (default %(default)s)")
    parser.add_argument("--baseline", metavar="DIR", help="also time the covshift package of the checkout DIR")
    parser.add_argument("--compile", action="store_true", help="time torch.compile'd models (see above)")
    args = parser.parse_args()
    if args.malloc == "steady":
        steady_malloc()

    model, batches, described = workload(args.model, args.batch_size, args.steps)
    if args.compile:
        compiled_main(args, model, batches, described)
        return
    configs: dict[str, Callable[[], AbstractContextManager]] = {
        "no hooks": nullcontext,
        "covshift every=1": lambda: covshift.attach(model, every=1, sample_size=args.sample_size),
        "covshift every=10": lambda: covshift.attach(model, every=10, sample_size=args.sample_size),
        "covshift defaults, long run": lambda: at_step(covshift.attach(model, sample_size=args.sample_size),
                                                       LONG_RUN_STEP),
        "covshift never recording": lambda: covshift.attach(model, every=10**9),
        "every=1 + gradients": lambda: covshift.attach(model, every=1, sample_size=args.sample_size, gradients=True),
        "defaults + gradients, long": lambda: at_step(
            covshift.attach(model, sample_size=args.sample_size, gradients=True), LONG_RUN_STEP),
        "every=1 + alerts": lambda: covshift.attach(model, every=1, sample_size=args.sample_size,
                                                    on_alert=lambda alert: None),
        "defaults + alerts, long": lambda: at_step(
            covshift.attach(model, sample_size=args.sample_size, on_alert=lambda alert: None), LONG_RUN_STEP),
        **(baseline_configs(load_baseline(args.baseline), model, args.sample_size) if args.baseline else {}),
        "bare sums+sorted sample": lambda: LayerHooks(model, bare_summary),
        "reductions only": lambda: LayerHooks(model, reductions_only),
        "naive var_mean+quantile": lambda: LayerHooks(model, naive_summary),
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    faults: dict[str, list[float]] = {name: [] for name in configs}
    warm_up = [nullcontext, configs["covshift every=1"], *([configs["baseline every=1"]] if args.baseline else [])]
    for recorder in warm_up:  # lazy imports of the store included
        time_steps(model, batches[:3], recorder)
    for _ in range(args.rounds):
        order = list(configs)
        random.shuffle(order)
        for name in order:
            seconds, step_faults = time_steps(model, batches, configs[name])
            times[name].append(seconds)
            faults[name].append(step_faults)
    print(f"{described}, "
          f"{args.rounds} rounds x {args.steps} steps, sample_size {args.sample_size}, "
          f"malloc {args.malloc}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'config':<28} {'step (ms)':>10} {'ratio':>7} {'ratio IQR':>15} {'faults/step':>12}")
    for name, values in times.items():
        ratios = [value / base for value, base in zip(values, times["no hooks"])]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(f"{name:<28} {statistics.median(values) * 1e3:>10.2f} {statistics.median(ratios):>6.3f}x "
              f"{q1:>6.3f}-{q3:.3f}x {statistics.median(faults[name]):>12.0f}")
    if args.baseline:
        print(f"covshift against the baseline ({args.baseline}), difference of ratios within each round:")
        for kind in ("every=1", "every=10", "defaults, long run"):
            diffs = [(new - old) / base for new, old, base in
                     zip(times[f"covshift {kind}"], times[f"baseline {kind}"], times["no hooks"])]
            q1, _, q3 = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else diffs * 3
            print(f"  {kind:<20} {statistics.median(diffs):+.3f} (IQR {q1:+.3f} to {q3:+.3f})")


if __name__ == "__main__":
    main()
