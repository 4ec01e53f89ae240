"""The BatchNorm paper's Figure 1 (Ioffe & Szegedy 2015), measured three ways.

The setting of Figure 1: a 784-100-100-100-10 MLP with sigmoid nonlinearities on
MNIST, batch 60, 50,000 steps, with and without BatchNorm before each sigmoid.
The figure shows (a) test accuracy against steps and (b, c) the 15th, 50th and
85th percentiles of the input of one sigmoid of the last hidden layer over
training. Here covshift records, for each network:

- the inputs of every linear layer and every sigmoid (per-layer drift; the
  single units of the paper's view come from the last sigmoid's per-unit
  quantiles on a fixed probe batch);
- the null noise floor (:mod:`covshift.science.null_floor`) on the probe at the training batch size;
- gradient ICS (:mod:`covshift.science.gradient_ics`, Santurkar et al. 2018) of the linear layers.

The learning rate, momentum and initialization are not given in the paper's text
for Figure 1; the defaults here (SGD, lr 0.1, no momentum, PyTorch's default
init from ``--seed``) are this experiment's choices. The variant ``noisy`` (BN
followed by time-varying noise, :class:`NoisyBatchNorm`) is the network of
Santurkar et al. §2.1 in this MLP; ``covshift experiment noisy-bn`` trains it
beside the other two.

Python entry point :func:`run_experiment`; command line ``covshift experiment
bn-paper`` through :func:`add_arguments` and :func:`run_from_args`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import covshift
from covshift.checks import check_int
from covshift.experiments.data import DATASETS, normalize
from covshift.experiments.mnist_bn import (
    EXPERIMENT_FILE,
    add_data_arguments,
    evaluate,
    prepare,
)

VARIANTS = ("plain", "batchnorm", "noisy")
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
FIGURE = "figure1.png"
GRADIENT_FIGURE = "gradient_ics.png"
HIDDEN = 3


class NoisyBatchNorm(nn.Module):
    """BatchNorm followed by noise with non-zero mean and non-unit variance that changes every step.

    The distribution (Santurkar et al. 2018, §2.1, as implemented here): at each
    optimizer step ``t`` (call :meth:`resample`), every unit ``j`` draws a shift
    ``μ_tj ~ U(−mean_range, mean_range)`` and a scale ``s_tj ~ U(1, scale_max)``;
    during that step each example's activation is ``s_tj · BN(x)_j + μ_tj``. So the
    next layer's input distribution has a mean and spread that jump every step.
    In eval mode the noise is replaced by its expectation (scale ``(1 + scale_max) / 2``,
    shift 0). The draws come from the module's own generator (seeded), so the
    global RNG and the batch order are untouched.
    """

    def __init__(self, features: int, mean_range: float = 1.0, scale_max: float = 2.0, seed: int = 0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(features)
        self.mean_range, self.scale_max = mean_range, scale_max
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("shift", torch.zeros(features), persistent=False)
        self.register_buffer("scale", torch.ones(features), persistent=False)
        self.resample()

    def resample(self) -> None:
        """Draw this step's shift and scale per unit."""
        n = len(self.shift)
        with torch.no_grad():
            self.shift.copy_((torch.rand(n, generator=self.generator) * 2 - 1) * self.mean_range)
            self.scale.copy_(1 + torch.rand(n, generator=self.generator) * (self.scale_max - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        if self.training:
            return y * self.scale + self.shift
        return y * ((1 + self.scale_max) / 2)


def mlp(variant: str, seed: int = 0, noise_mean: float = 1.0, noise_scale: float = 2.0) -> nn.Sequential:
    """The Figure 1 network: ``fc1, [bn1], sig1, …, fc3, [bn3], sig3, out``; weights from ``seed``.

    The linear layers get the same initial weights in every variant (the seed is
    reset before each is built), so the variants differ only in normalization.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = 784
    gen = torch.Generator().manual_seed(seed)
    for k in range(1, HIDDEN + 1):
        linear = nn.Linear(width, 100)
        _init(linear, gen)
        layers[f"fc{k}"] = linear
        if variant == "batchnorm":
            layers[f"bn{k}"] = nn.BatchNorm1d(100)
        elif variant == "noisy":
            layers[f"bn{k}"] = NoisyBatchNorm(100, noise_mean, noise_scale, seed=seed * 100 + k)
        layers[f"sig{k}"] = nn.Sigmoid()
        width = 100
    out = nn.Linear(100, 10)
    _init(out, gen)
    layers["out"] = out
    return nn.Sequential(layers)


def _init(linear: nn.Linear, gen: torch.Generator) -> None:
    """PyTorch's default Linear init, drawn from ``gen``."""
    bound = 1 / math.sqrt(linear.in_features)
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=gen)
        linear.bias.uniform_(-bound, bound, generator=gen)


@dataclass
class Config:
    """Settings of one experiment; the defaults are the command line's."""

    steps: int = 50_000
    batch_size: int = 60
    lr: float = 0.1
    momentum: float = 0.0
    seed: int = 1
    out: str = "runs/bn-paper"
    variants: tuple[str, ...] = ("plain", "batchnorm")
    dataset: str = "mnist"
    data_dir: str | None = None
    cache_dir: str | None = None
    download: bool = True
    train_split: str = "train"
    test_split: str = "test"
    every: int = 50
    eval_every: int = 500
    probe_size: int = 600
    null_every: int = 5000
    null_splits: int = 50
    ics_every: int = 1000
    noise_mean: float = 1.0
    noise_scale: float = 2.0
    progress: bool = True

    def check(self) -> None:
        for name in ("steps", "batch_size", "every", "eval_every", "null_every", "null_splits", "ics_every"):
            check_int(name, getattr(self, name))
        check_int("probe_size", self.probe_size, minimum=2 * self.batch_size)
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"variants must be names from {VARIANTS}, got {list(self.variants)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {self.dataset!r}")


def add_arguments(parser: argparse.ArgumentParser, variants: tuple[str, ...] = ("plain", "batchnorm")) -> None:
    """Add the experiment's options to ``parser``."""
    d = Config()
    parser.set_defaults(variants=variants)
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="default %(default)s")
    parser.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate (default %(default)s)")
    parser.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="weights, data order, noise (default %(default)s)")
    add_data_arguments(parser, d, data_dir_help="folder with the IDX files (as for mnist-bn)",
                       cache_dir_help="where missing files are downloaded", train_split_help="e.g. train, test[:8000]")
    parser.add_argument("--every", type=int, default=d.every, help="record one step in N (default %(default)s)")
    parser.add_argument("--eval-every", type=int, default=d.eval_every,
                        help="test accuracy and the probe every N steps (default %(default)s)")
    parser.add_argument("--probe-size", type=int, default=d.probe_size, help="probe examples (default %(default)s)")
    parser.add_argument("--null-every", type=int, default=d.null_every,
                        help="null noise floor every N steps (default %(default)s)")
    parser.add_argument("--null-splits", type=int, default=d.null_splits, help="random splits (default %(default)s)")
    parser.add_argument("--ics-every", type=int, default=d.ics_every,
                        help="gradient ICS every N steps (default %(default)s)")
    parser.add_argument("--noise-mean", type=float, default=d.noise_mean,
                        help="noisy BN: shift ~ U(-a, a) per unit and step (default %(default)s)")
    parser.add_argument("--noise-scale", type=float, default=d.noise_scale,
                        help="noisy BN: scale ~ U(1, b) per unit and step (default %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress output")


def run_from_args(args: argparse.Namespace) -> Path:
    config = Config(**{f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)})
    return run_experiment(config)


def run_experiment(config: Config | None = None, **settings: object) -> Path:
    """Train each variant, record drift, the null floor and gradient ICS; write results; return the out dir."""
    config = config if config is not None else Config(**settings)  # type: ignore[arg-type]
    config.variants = tuple(config.variants)
    config.check()
    out = Path(config.out)
    train, test, notice = prepare(config, config.variants)
    train_x = normalize(train.images, config.dataset).flatten(1)
    test_x = normalize(test.images, config.dataset).flatten(1)
    probe = train_x[: config.probe_size]
    experiment = {"config": asdict(config),
                  "data": {"dataset": config.dataset, "train": f"split {config.train_split!r}, {len(train)} examples ({train.source})",
                           "test": f"split {config.test_split!r}, {len(test)} examples ({test.source})", "notice": notice},
                  "seconds": {}}
    for name in config.variants:
        model = mlp(name, config.seed, config.noise_mean, config.noise_scale)
        started = time.perf_counter()
        train_model(model, name, (train_x, train.labels), (test_x, test.labels), probe, config, out / name)
        experiment["seconds"][name] = round(time.perf_counter() - started, 1)
    (out / EXPERIMENT_FILE).write_text(json.dumps(experiment, indent=2))
    write_results(out)
    print(f"results: {out / RESULTS_MD}", flush=True)
    return out


def train_model(
    model: nn.Sequential,
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    probe: torch.Tensor,
    config: Config,
    store: Path,
) -> covshift.Run:
    """SGD for ``config.steps`` steps under covshift, null floor and gradient ICS; the batch order is the seed's."""
    from covshift.science.gradient_ics import GradientICS
    from covshift.science.null_floor import NullFloor

    images, labels = train
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    order_rng = torch.Generator().manual_seed(config.seed)
    linears = [n for n, m in model.named_children() if isinstance(m, nn.Linear)]
    recorded = [n for n, m in model.named_children() if isinstance(m, (nn.Linear, nn.Sigmoid))]
    order = torch.randperm(len(labels), generator=order_rng)
    position = 0
    started = time.perf_counter()
    # Every unit keeps its percentiles (sketch_channels=None): the paper's view is of single units.
    with covshift.attach(model, optimizer=optimizer, layers=recorded, every=config.every, store=store,
                         sketch_channels=None, name=name) as tracker:
        tracker.probe(probe, every=config.eval_every)
        null = NullFloor(model, probe, optimizer=optimizer, every=config.null_every, directory=store,
                         layers=recorded, size=config.batch_size, splits=config.null_splits)
        ics = GradientICS(model, optimizer, F.cross_entropy, every=config.ics_every, directory=store, layers=linears)
        # noisy BN draws the next step's noise after the measurements of this one (hooks run in order)
        noisy = [m for m in model.modules() if isinstance(m, NoisyBatchNorm)]
        resample = optimizer.register_step_post_hook(lambda *_: [m.resample() for m in noisy]) if noisy else None
        model.train()
        for step in range(config.steps):
            if position + config.batch_size > len(labels):
                order, position = torch.randperm(len(labels), generator=order_rng), 0
            index = order[position : position + config.batch_size]
            position += config.batch_size
            x, y = images[index], labels[index]
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            ics.batch(x, y)
            optimizer.step()
            if step % config.eval_every == 0 or step == config.steps - 1:
                test_loss, test_acc = evaluate(model, *test)
                tracker.run.log(step, train_loss=loss.item(), test_loss=test_loss, test_acc=test_acc)
                if config.progress:
                    print(f"{name} step {step}: loss {loss.item():.4f} test acc {test_acc:.4f} "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)
        ics.close()
        null.close()
        if resample is not None:
            resample.remove()
    return tracker.run


# -- results ---------------------------------------------------------------------
def unit_percentiles(run: covshift.Run, layer: str, units: int = 3, source: str = "probe") -> object:
    """The 15th, 50th and 85th percentiles of the first ``units`` units of ``layer``'s input, per step."""
    stats = run.stats(source)
    rows = stats[(stats["layer"].astype(str) == layer) & (stats["channel"] < units)]
    return rows[["step", "channel", "q0.15", "q0.5", "q0.85"]].reset_index(drop=True)


def summarize(out: Path) -> dict:
    """Everything results.md states, computed from the stored runs."""
    from covshift.metrics import names as metric_names
    from covshift.science.gradient_ics import load_gradient_ics
    from covshift.science.null_floor import drift_to_null, load_null_floor
    from covshift.metrics.verdict import compare_runs

    experiment = json.loads((out / EXPERIMENT_FILE).read_text())
    variants = experiment["config"]["variants"]
    runs = {name: covshift.load(out / name) for name in variants}
    summary: dict = {"variants": variants, "accuracy": {}, "drift": {}, "calibration": {}, "gradient_ics": {}}
    for name, run in runs.items():
        curves = run.curves()
        last = curves.iloc[-1]
        summary["accuracy"][name] = {"step": int(last["step"]), "test_acc": float(last["test_acc"]),
                                     "best_test_acc": float(curves["test_acc"].max())}
        table = drift_to_null(run, load_null_floor(out / name), metric=list(metric_names()))
        table = table[table["step"] > 0]
        first = str(run.layers["layer"].iloc[0])
        data_layer = table[table["layer"].astype(str) == first]
        summary["calibration"][name] = {
            m: float(rows["value"].mean() / rows["null_mean"].mean())
            for m, rows in data_layer.groupby("metric")}
        hidden = table[table["layer"].astype(str) != first]
        summary["drift"][name] = {
            layer: {"w1": float(rows["value"].mean()), "w1_to_null_q95": float(rows["ratio_q95"].mean())}
            for layer, rows in hidden[hidden["metric"] == "wasserstein"].groupby(hidden["layer"].astype(str))}
        ics = load_gradient_ics(out / name)
        ics = ics[ics["layer"].astype(str) != "fc1"]  # fc1 has no earlier layer: 0 by definition
        summary["gradient_ics"][name] = {
            str(layer): {"ics_norm": float(rows["ics_norm"].mean()), "relative": float(rows["relative"].mean()),
                         "cosine": float(rows["cosine"].mean()), "grad_norm": float(rows["grad_norm"].mean())}
            for layer, rows in ics.groupby("layer", observed=True)}
    verdicts = {}
    base = variants[0]
    for other in variants[1:]:
        v = compare_runs(runs[base], runs[other], base, other)
        ics_b = summary["gradient_ics"][base]
        ics_o = summary["gradient_ics"][other]
        layers = [layer for layer in ics_b if layer in ics_o]
        mean_b = sum(ics_b[layer]["relative"] for layer in layers) / max(len(layers), 1)
        mean_o = sum(ics_o[layer]["relative"] for layer in layers) / max(len(layers), 1)
        lower = sum(ics_o[layer]["relative"] < ics_b[layer]["relative"] for layer in layers)
        if not layers or not mean_o > 0:
            grad = "gradient ICS: no layers to compare"
        else:
            word = f"{mean_b / mean_o:.1f}× lower" if mean_b > mean_o else f"{mean_o / mean_b:.1f}× higher"
            grad = (f"gradient ICS (mean ‖G − G'‖/‖G‖ over {', '.join(layers)}): {other} {word} than {base} "
                    f"({lower} of {len(layers)} layers lower)")
        verdicts[other] = {"drift": v.headline, "drift_details": v.details, "gradient_ics": grad}
    summary["verdicts"] = verdicts
    summary["data"] = experiment["data"]
    summary["config"] = experiment["config"]
    return summary


def write_results(out: Path) -> dict:
    """``results.json``, ``results.md`` and ``figure1.png`` from the stored runs."""
    summary = summarize(out)
    (out / RESULTS_JSON).write_text(json.dumps(summary, indent=2))
    figure(out, summary["variants"]).savefig(out / FIGURE, dpi=110)
    gradient_figure(out, summary["variants"]).savefig(out / GRADIENT_FIGURE, dpi=110)
    (out / RESULTS_MD).write_text(to_markdown(summary))
    return summary


def figure(out: Path, variants: list[str]) -> object:
    """Figure 1's panels: test accuracy against steps, then per variant the last sigmoid input's
    15/50/85th percentiles of three units on the probe batch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * (1 + len(variants)), 3.4), layout="constrained")
    axes = fig.subplots(1, 1 + len(variants))
    last = f"sig{HIDDEN}"
    for name in variants:
        run = covshift.load(out / name)
        curves = run.curves()
        axes[0].plot(curves["step"], curves["test_acc"], label=name)
    axes[0].set(xlabel="step", ylabel="test accuracy", title="(a) test accuracy")
    axes[0].legend()
    for ax, name in zip(axes[1:], variants):
        frame = unit_percentiles(covshift.load(out / name), last)
        for unit, rows in frame.groupby("channel"):
            line = ax.plot(rows["step"], rows["q0.5"], lw=1.2, label=f"unit {unit}")[0]
            ax.fill_between(rows["step"], rows["q0.15"], rows["q0.85"], color=line.get_color(), alpha=0.2)
        ax.set(xlabel="step", ylabel=f"input of {last}", title=f"{name}: 15/50/85th percentiles")
        ax.legend(fontsize="small")
    return fig


def gradient_figure(out: Path, variants: list[str]) -> object:
    """Gradient ICS ‖G − G'‖/‖G‖ per layer against steps, one panel per variant, a shared y axis."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from covshift.reporting.plots import plot_gradient_ics
    from covshift.science.gradient_ics import load_gradient_ics

    fig = Figure(figsize=(4 * len(variants), 3.4), layout="constrained")
    axes = fig.subplots(1, len(variants), sharey=True, squeeze=False)[0]
    for ax, name in zip(axes, variants):
        frame = load_gradient_ics(out / name)
        plot_gradient_ics(frame[frame["layer"].astype(str) != "fc1"], "relative", ax=ax)
        ax.set_title(f"{name}: gradient ICS")
        ax.set_yscale("log")
    return fig


def to_markdown(summary: dict) -> str:
    c = summary["config"]
    lines = [
        "# BatchNorm paper, Figure 1 setting: three views of internal covariate shift",
        "",
        f"Data ({summary['config']['dataset']}): training {summary['data']['train']}; "
        f"test {summary['data']['test']}.",
        f"Settings: {c['steps']} steps, batch {c['batch_size']}, SGD lr {c['lr']} momentum {c['momentum']}, "
        f"seed {c['seed']}; recorded every {c['every']} steps, probe of {c['probe_size']} every {c['eval_every']}, "
        f"null floor ({c['null_splits']} random splits at the batch size) every {c['null_every']}, "
        f"gradient ICS every {c['ics_every']}.",
        "",
        f"![Figure 1]({FIGURE})",
        "",
        f"![Gradient ICS]({GRADIENT_FIGURE})",
        "",
        "| variant | final test acc | best test acc | at step |",
        "| --- | --- | --- | --- |",
    ]
    for name, acc in summary["accuracy"].items():
        lines.append(f"| {name} | {acc['test_acc']:.4f} | {acc['best_test_acc']:.4f} | {acc['step']} |")
    lines += ["", "## Verdicts (computed from the runs)", ""]
    for other, v in summary["verdicts"].items():
        lines += [f"- **Distributional drift** (W1 × σ_ref vs the initial step, hidden layers): {v['drift']}. "
                  f"{v['drift_details']}", f"- **Gradient ICS**: {v['gradient_ics']}."]
    lines += ["", "## Calibration: the input layer's drift / its null mean (≈ 1 when calibrated)", "",
              "| variant | " + " | ".join(sorted(next(iter(summary["calibration"].values())))) + " |",
              "| --- |" + " --- |" * len(next(iter(summary["calibration"].values())))]
    for name, ratios in summary["calibration"].items():
        lines.append(f"| {name} | " + " | ".join(f"{ratios[m]:.2f}" for m in sorted(ratios)) + " |")
    lines += ["", "## Gradient ICS per layer: mean ‖G − G'‖/‖G‖ (cos∠(G, G'))", "",
              "| layer | " + " | ".join(summary["variants"]) + " |", "| --- |" + " --- |" * len(summary["variants"])]
    lines += _layer_rows(list(next(iter(summary["gradient_ics"].values()))), summary["variants"],
                         summary["gradient_ics"], lambda g: f"{g['relative']:.3g} ({g['cosine']:.3f})")
    lines += ["", "## Drift of hidden layers: mean W1 (× σ_ref) and mean W1 / null 95th percentile", "",
              "| layer | " + " | ".join(summary["variants"]) + " |", "| --- |" + " --- |" * len(summary["variants"])]
    all_layers = list(dict.fromkeys(layer for name in summary["variants"] for layer in summary["drift"][name]))
    lines += _layer_rows(all_layers, summary["variants"], summary["drift"],
                         lambda row: f"{row['w1']:.3g} ({row['w1_to_null_q95']:.2f}×)")
    return "\n".join(lines) + "\n"


def _layer_rows(layers: list[str], variants: list[str], table: dict, cell: object) -> list[str]:
    """One markdown row per layer: ``cell(table[variant][layer])`` per variant, "–" where the layer is missing."""
    rows = []
    for layer in layers:
        values = [table[name].get(layer) for name in variants]
        rows.append(f"| {layer} | " + " | ".join(cell(v) if v else "–" for v in values) + " |")
    return rows
