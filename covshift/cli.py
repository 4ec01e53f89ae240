"""The ``covshift`` command: a thin shell that parses, calls the library and prints.

>>> build_parser().parse_args(["compare", "runs/a", "runs/b"]).command
'compare'
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from covshift import __version__
from covshift.columns import SOURCES
from covshift.defaults import DEFAULT_MAX_POINTS, DEFAULT_METRICS, DEFAULT_TOP, MAX_HEIGHT_PX, PROGRESS_LAYERS

# The library (torch, pandas, matplotlib) is imported inside the commands, so that
# ``covshift --help`` answers at once; the defaults it shows are the library's own.

_MAIN_EPILOG = """\
examples:
  covshift experiment mnist-bn --help     the reference experiment (BatchNorm vs none)
  covshift stats runs/plain               what a run holds
  covshift compare runs/plain runs/bn     per-layer drift side by side, with ratios
  covshift report runs/plain runs/bn -o report/
"""

_REPORT_EPILOG = f"""\
examples:
  covshift report runs/plain -o report/
  covshift report runs/plain runs/bn -o report/ --metric wasserstein ks
  covshift report runs/plain runs/bn -o report/ --layers 'conv*' fc1 --reference previous
  covshift report runs/resnet50 -o report/ --top 12 --layers 'layer4.*'

writes report.html (self-contained: open it offline in any browser), one PNG per
figure and summary.csv into the output directory. The page leads with the verdict,
the --top layers that drift most and a layer × step heatmap of every layer; the
per-layer figures (percentiles, drift, channels) are drawn for those top layers and
the --layers asked for. No PNG is taller than {MAX_HEIGHT_PX:,} pixels: more layers go to
further pages (heatmap-2.png, drift-2.png, ...). Gradient ICS and a null noise
floor are drawn when the runs hold them.
"""

_WATCH_EPILOG = """\
examples:
  covshift watch runs/job                 refresh every 5 s until Ctrl-C
  covshift watch runs/job --once --top 5  one table, for scripts

Read-only: safe while the training process writes the run. Drift is W1 of each
layer's input at the newest recorded step from its first; alerts are those the
training stored (attach(..., on_alert=...)).
"""

_METRICS_EPILOG = """\
Each line: the name --metric takes, the label figures and tables use, and its
glossary line. Add your own with covshift.metrics.register(...) in Python, or
for this command through a package's "covshift.metrics" entry point
(docs/architecture.md, "Where to add a drift metric").
"""

_COMPARE_EPILOG = """\
examples:
  covshift compare runs/plain runs/bn
  covshift compare runs/plain runs/bn --metric mean_shift --reference previous

mean_* is each layer's drift averaged over all recorded steps, final_* its drift at
the last one, noise_* its mean noise floor (NaN without a probe); *_a is RUN_A,
*_b is RUN_B, and the ratio columns are b / a (below 1: RUN_B drifts less).
"""

_STATS_EPILOG = """\
examples:
  covshift stats runs/plain
  covshift stats runs/plain --layer conv1 fc      only these layers' rows are read
"""

_EXPERIMENT_EPILOG = """\
examples:
  covshift experiment mnist-bn --help
  covshift experiment mnist-bn --out runs/mnist-bn
  covshift experiment bn-paper --steps 2000 --out runs/bn-paper
  covshift experiment noisy-bn --steps 2000 --out runs/noisy-bn
"""

_BN_PAPER_EPILOG = """\
examples:
  covshift experiment bn-paper --out runs/bn-paper                  # 50,000 steps, as in the paper
  covshift experiment bn-paper --steps 2000 --out runs/quick
  covshift experiment bn-paper --steps 5000 --seeds 5 --out runs/bn-paper-seeds
  covshift experiment bn-paper --data-dir DIR --train-split 'test[:8000]' --test-split 'test[8000:]'

Figure 1 of Ioffe & Szegedy (2015): a 784-100-100-100-10 sigmoid MLP, batch 60, with and
without BatchNorm before each sigmoid; drift, a null noise floor and gradient ICS
(Santurkar et al. 2018) recorded; writes results.md, results.json and figure1.png.
Drift factors are stated by several measures: W1 divided by the reference's σ, raw W1
and KS, against step 0, a later step and the previous step. With --seeds N each seed
goes to OUT/seed-<seed>/ and OUT/seeds.md states every number over the seeds.
"""

_NOISY_BN_EPILOG = """\
examples:
  covshift experiment noisy-bn --steps 2000 --out runs/noisy-bn
  covshift experiment noisy-bn --steps 2000 --seeds 5 --out runs/noisy-bn-seeds

The bn-paper network four ways: plain, BatchNorm, and BatchNorm followed by noise whose
per-unit mean mu ~ U(-a, a) and scale s ~ U(1, b) are redrawn every step (Santurkar et al.
2018, §2.1; --noise-mean a, --noise-scale b): "noisy" scales and shifts the whole batch
by (s, mu); "noisy_iid" adds to every activation of every example its own noise
~ N(mu, s^2), i.i.d., as Santurkar et al. describe.
"""

_MNIST_BN_EPILOG = """\
examples:
  covshift experiment mnist-bn --out runs/mnist-bn
  covshift experiment mnist-bn --epochs 1 --train-split 'train[:10%]' --out runs/quick
  covshift experiment mnist-bn --epochs 2 --seeds 5 --out runs/mnist-bn-seeds
  covshift report runs/mnist-bn/plain runs/mnist-bn/batchnorm -o report/
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``covshift`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(with_experiments=argv[:1] == ["experiment"])
    except ImportError as err:
        print(f"covshift experiment: error: cannot load the experiments: {_one_line(err)} "
              "(they need the data extra: pip install 'covshift[data]')", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (OSError, ValueError) as err:  # RunFileError is a ValueError
        print(f"covshift {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"covshift {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser(*, with_experiments: bool = False) -> argparse.ArgumentParser:
    """The argument parser; experiment options are added only when asked (their modules load lazily)."""
    parser = argparse.ArgumentParser(
        prog="covshift",
        description="See internal covariate shift: how each layer's input distribution drifts while a network trains.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"covshift {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    drawing = _command(commands, "report", "draw the drift report of one or more runs", _REPORT_EPILOG, _report)
    drawing.add_argument("runs", nargs="+", metavar="RUN", help="run directories (drawn side by side)")
    drawing.add_argument("-o", "--out", required=True, metavar="DIR", help="output directory (created if needed)")
    _drift_options(drawing, metric_nargs="+")
    drawing.add_argument("--layers", nargs="+", metavar="NAME",
                         help="layer names or glob patterns that get per-layer figures besides the --top ones")
    drawing.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="K",
                         help="the K most drifting layers get per-layer figures; 0: only --layers "
                              "(default: %(default)s)")
    drawing.add_argument("--match", nargs="+", type=_layer_pair, metavar="LATER=FIRST",
                         help="pair a later run's layer with the first run's for the verdict (default: same "
                              "name, type and channel count, then the k-th layer of each type and channel count)")
    drawing.add_argument("--channel", type=int, metavar="C",
                         help="draw percentiles of channel C instead of the mean over channels")
    drawing.add_argument("--max-points", type=int, default=DEFAULT_MAX_POINTS, metavar="N",
                         help="most steps drawn per line; tables use every step (default: %(default)s)")
    drawing.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                         help=f"no progress bar (default: one on stderr for runs of {PROGRESS_LAYERS} layers or more)")

    compare = _command(commands, "compare", "print a per-layer drift table of two runs, with ratios",
                       _COMPARE_EPILOG, _compare)
    compare.add_argument("run_a", metavar="RUN_A", help="the baseline run directory")
    compare.add_argument("run_b", metavar="RUN_B", help="the run compared with it")
    _drift_options(compare, metric_nargs=None)
    compare.add_argument("--match", choices=("name", "type"), default="name",
                         help="pair layers by name, or the k-th layer of each type with the k-th "
                              "(for networks named differently; default: %(default)s)")

    stats = _command(commands, "stats", "show what a run holds: layers, channels, steps, sources, size",
                     _STATS_EPILOG, _stats)
    stats.add_argument("run", metavar="RUN", help="a run directory")
    stats.add_argument("--layer", nargs="+", metavar="NAME", default=None,
                       help="print these layers' records per step instead (channels aggregated: "
                            "mean of the means and of the standard deviations, extrema, zero fraction); "
                            "only their rows are read")
    stats.add_argument("--source", choices=SOURCES, help="with --layer: the records' source (default train)")

    watch = _command(commands, "watch", "show the most drifting layers of a run while it is written, refreshing",
                     _WATCH_EPILOG, _watch)
    watch.add_argument("run", metavar="RUN", help="a run directory (another process may be writing it)")
    watch.add_argument("--top", type=int, default=10, metavar="K", help="layers shown (default: %(default)s)")
    watch.add_argument("--interval", type=float, default=5.0, metavar="S",
                       help="seconds between refreshes (default: %(default)s)")
    watch.add_argument("--once", action="store_true", help="print the table once and exit")

    _command(commands, "metrics", "list the drift metrics: covshift's own and those registered by packages",
             _METRICS_EPILOG, _metrics)

    experiment = _command(commands, "experiment", "run a reference experiment", _EXPERIMENT_EPILOG, None)
    experiments = experiment.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    mnist = experiments.add_parser(
        "mnist-bn",
        help="train an MNIST CNN with and without BatchNorm and compare their drift",
        description="Train the same MNIST CNN with and without BatchNorm, recording both with covshift.",
        epilog=_MNIST_BN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mnist.set_defaults(handler=_experiment)
    paper = experiments.add_parser(
        "bn-paper",
        help="the BatchNorm paper's Figure 1: sigmoid MLP with and without BN, three views of ICS",
        description="Train the Figure 1 MLP of Ioffe & Szegedy (2015) with and without BatchNorm, recording "
                    "drift, a null noise floor and gradient ICS.",
        epilog=_BN_PAPER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    paper.set_defaults(handler=_bn_paper)
    noisy = experiments.add_parser(
        "noisy-bn",
        help="the bn-paper MLP plain, with BN, and with two kinds of noisy BN (Santurkar et al. 2018)",
        description="Train the bn-paper MLP without BN, with BN and with noisy BN (per-step and per-sample "
                    "noise), recording drift, a null noise floor and gradient ICS.",
        epilog=_NOISY_BN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    noisy.set_defaults(handler=_bn_paper)
    if with_experiments:
        _mnist_bn().add_arguments(mnist)
        from covshift.experiments import bn_paper

        bn_paper.add_arguments(paper)
        bn_paper.add_arguments(noisy, variants=bn_paper.VARIANTS)
        noisy.set_defaults(out="runs/noisy-bn")
    return parser


def _command(
    commands: argparse._SubParsersAction,
    name: str,
    summary: str,
    epilog: str,
    handler: Callable[[argparse.Namespace], int] | None,
) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                              epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.set_defaults(handler=handler)
    return sub


def _drift_options(parser: argparse.ArgumentParser, *, metric_nargs: str | None) -> None:
    if metric_nargs:
        parser.add_argument("--metric", nargs=metric_nargs, default=list(DEFAULT_METRICS), metavar="M",
                            help="drift metrics to draw, names from `covshift metrics` or all (default: %(default)s)")
    else:
        parser.add_argument("--metric", default="wasserstein", metavar="M",
                            help="drift metric, a name from `covshift metrics` (default: %(default)s)")
    parser.add_argument("--reference", default="initial", type=_reference,
                        help="drift from: initial, previous, a step number or rolling:K (default: %(default)s)")
    parser.add_argument("--source", default="train", choices=("train", "probe"),
                        help="records to measure: training batches or the fixed probe batch (default: %(default)s)")


def _layer_pair(text: str) -> tuple[str, str]:
    later, sep, first = text.partition("=")
    if not sep or not later or not first:
        raise argparse.ArgumentTypeError(f"expected LATER=FIRST (two layer names), got {text!r}")
    return later, first


def _reference(text: str) -> str | int:
    return int(text) if text.lstrip("-").isdigit() else text


def _report(args: argparse.Namespace) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise NotADirectoryError(f"-o {args.out} is a file, not a directory; choose a directory for the report")
    from covshift.reporting.build import report

    path = report(args.runs, args.out, metrics=args.metric, layers=args.layers, top=args.top,
                  reference=args.reference, source=args.source, channel=args.channel, max_points=args.max_points,
                  match=dict(args.match) if args.match else None, progress=args.progress)
    print(f"wrote {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from covshift.metrics.api import drift_table
    from covshift.metrics import get as get_metric
    from covshift.reporting.text import reference_words
    from covshift.store.run import load

    run_a, run_b = load(args.run_a), load(args.run_b)
    table = drift_table(run_a, run_b, metric=args.metric, reference=args.reference, source=args.source,
                        match=args.match)
    if (table["layer_a"] == table["layer_b"]).all():
        table = table.drop(columns="layer_b").rename(columns={"layer_a": "layer"})
    print(f"{get_metric(args.metric).axis_label()} drift from the {reference_words(args.reference)} ({args.source} records): "
          f"A = {run_a.name} ({run_a.directory}), B = {run_b.name} ({run_b.directory})")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-"))
    return 0


def _watch(args: argparse.Namespace) -> int:
    import time

    from covshift.reporting.overview import live_table

    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() and not args.once else ""
    while True:
        print(clear + live_table(args.run, top=args.top), flush=True)
        if args.once:
            return 0
        time.sleep(args.interval)


def _metrics(args: argparse.Namespace) -> int:
    from covshift.metrics import get, names

    rows = [(name, get(name)) for name in names()]
    width = max(len(name) for name, _ in rows)
    for name, metric in rows:
        unit = "÷ σ_ref when normalized" if metric.scaled else "scale-free"
        print(f"{name:<{width}}  {metric.label} ({unit}): {metric.description}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from covshift.reporting.overview import layer_overview, run_overview
    from covshift.store.run import load

    if args.source is not None and args.layer is None:
        raise ValueError("--source selects the records of --layer: give --layer NAME too")
    run = load(args.run)
    print(run_overview(run) if args.layer is None else layer_overview(run, args.layer, args.source or "train"))
    return 0


def _experiment(args: argparse.Namespace) -> int:
    _mnist_bn().run_from_args(args)
    return 0


def _bn_paper(args: argparse.Namespace) -> int:
    from covshift.experiments import bn_paper

    bn_paper.run_from_args(args)
    return 0


def _mnist_bn() -> ModuleType:
    from covshift.experiments import mnist_bn

    return mnist_bn


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
