"""The reference experiment: the same CNN trained with and without BatchNorm, drift measured.

Both networks start from the same convolution weights and see the same batches
in the same order. covshift records the input of every convolution on training
batches and on a fixed probe batch; afterwards the runs are compared layer by
layer (:mod:`covshift.experiments.results`).

Python entry point :func:`run_experiment`; command line ``covshift experiment
mnist-bn`` through :func:`add_arguments` and :func:`run_from_args`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import covshift
from covshift.checks import check_int
from covshift.experiments import results
from covshift.experiments.data import DATASETS, FALLBACK_TRAIN, SPLIT_FILES, Split, load_splits, normalize
from covshift.experiments.model_table import model_table
from covshift.experiments.models import reference_pair
from covshift.experiments.seeds import SEEDS_JSON, SEEDS_MD, rewrite_seeds, run_seeds
from covshift.science.gradient_ics import GradientICS

#: The two networks, in training order: run directory name and label.
MODELS = ("plain", "batchnorm")
EXPERIMENT_FILE = "experiment.json"
EVAL_BATCH = 1000


@dataclass
class Config:
    """Settings of one experiment; the defaults are the command line's."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    seed: int = 1
    out: str = "runs/mnist-bn"
    dataset: str = "mnist"
    data_dir: str | None = None
    cache_dir: str | None = None
    download: bool = True
    train_split: str = "train"
    test_split: str = "test"
    every: int = 10
    probe_every: int = 10
    probe_size: int = 256
    ics_every: int = 50
    seeds: int = 1
    report: bool = True
    progress: bool = True

    def check(self) -> None:
        """Raise ``ValueError`` naming the first setting that is out of range."""
        for name in ("epochs", "batch_size", "every", "probe_every", "ics_every", "seeds"):
            check_int(name, getattr(self, name))
        check_int("probe_size", self.probe_size, minimum=2)
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {self.dataset!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the experiment's options to ``parser`` (used by ``covshift experiment mnist-bn``)."""
    d = Config()
    parser.add_argument("--epochs", type=int, default=d.epochs, help="training epochs (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size (default %(default)s)")
    parser.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate (default %(default)s)")
    parser.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of weights and data order (default %(default)s)")
    add_data_arguments(
        parser, d,
        data_dir_help="folder with the IDX files, in torchvision's layout (DIR/MNIST/raw/) or flat; train and test "
                      "must both be there (no download, no fallback)",
        cache_dir_help="where missing files are downloaded (default ~/.cache/covshift/datasets)",
        train_split_help="e.g. train, train[:10%%], test[:8000]",
    )
    parser.add_argument("--every", type=int, default=d.every, help="record one training step in N (default %(default)s)")
    parser.add_argument(
        "--probe-every", type=int, default=d.probe_every, help="run the fixed probe batch every N steps (default %(default)s)"
    )
    parser.add_argument(
        "--probe-size", type=int, default=d.probe_size, help="examples in the probe batch (default %(default)s)"
    )
    parser.add_argument(
        "--ics-every", type=int, default=d.ics_every,
        help="gradient ICS of the convolutions every N optimizer steps (Santurkar et al.; 7 extra forward/backward "
             "passes each; default %(default)s)")
    parser.add_argument(
        "--seeds", type=int, default=d.seeds,
        help="run seeds --seed, --seed+1, ... into OUT/seed-<seed>/ and write OUT/seeds.md: each number's median "
             "over seeds, min-max and 95%% bootstrap interval; the report compares all seeds (default %(default)s)")
    parser.add_argument("--no-report", dest="report", action="store_false", help="skip the HTML drift report")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument(
        "--from-runs",
        action="store_true",
        help="do not train: recompute results.md, results.json and the report from the runs in --out "
             "(of every seed and seeds.md, when --out holds a --seeds run)",
    )


def add_data_arguments(
    parser: argparse.ArgumentParser, d: object, *, data_dir_help: str, cache_dir_help: str, train_split_help: str
) -> None:
    """The output and data options, ``--out`` to ``--test-split``, with defaults from the config ``d``."""
    parser.add_argument("--out", default=d.out, help="output directory, must not hold runs yet (default %(default)s)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default=d.dataset, help="default %(default)s")
    parser.add_argument("--data-dir", default=None, help=data_dir_help)
    parser.add_argument("--cache-dir", default=None, help=cache_dir_help)
    parser.add_argument("--no-download", dest="download", action="store_false", help="never try to download")
    parser.add_argument("--train-split", default=d.train_split, help=train_split_help)
    parser.add_argument("--test-split", default=d.test_split, help="e.g. test, test[8000:]")


def run_from_args(args: argparse.Namespace) -> Path:
    """Run (or, with ``--from-runs``, re-summarize) the experiment from parsed options; return the out dir."""
    if getattr(args, "from_runs", False) and (Path(args.out) / SEEDS_JSON).is_file():
        rewrite_seeds(Path(args.out), lambda path: results.write_results(path, report=False))
        print(f"over seeds: {Path(args.out) / SEEDS_MD}", flush=True)
        return Path(args.out)
    if getattr(args, "from_runs", False):
        content = results.write_results(Path(args.out), report=args.report)
        print(f"results: {Path(args.out) / results.RESULTS_MD}", flush=True)
        if content.get("report"):
            print(f"report: {Path(args.out) / content['report']}", flush=True)
        return Path(args.out)
    config = Config(**{f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)})
    if config.seeds > 1:
        return run_seeded(config)
    return run_experiment(config)


def run_seeded(config: Config) -> Path:
    """:func:`run_experiment` for ``config.seeds`` seeds (:func:`covshift.experiments.seeds.run_seeds`), then one
    report of every seed's two runs (its verdict states the interval over seeds); return the out dir."""
    config.check()
    out = run_seeds(lambda one: run_experiment(replace(one, seeds=1, report=False)), config, config.seeds, "mnist-bn")
    if config.report:
        dirs = sorted(out.glob("seed-*/"), key=lambda path: int(path.name.split("-", 1)[1]))
        runs = [covshift.load(path / name) for name in MODELS for path in dirs]
        print(f"report: {covshift.report(runs, out / results.REPORT_DIR)}", flush=True)
    print(f"over seeds: {out / SEEDS_MD}", flush=True)
    return out


def run_experiment(config: Config | None = None, **settings: object) -> Path:
    """Train both networks, record their drift and write the results; return the output directory.

    Args:
        config: the settings; or give them as keywords (``run_experiment(epochs=1, ...)``).

    Returns:
        The output directory, holding ``plain/`` and ``batchnorm/`` (covshift runs),
        ``experiment.json``, ``results.json``, ``results.md`` and ``report/``.

    Raises:
        TypeError: both a ``config`` and keyword settings were given.
        ValueError: a setting is out of range or a split is malformed.
        FileExistsError: the output directory already holds runs.
        covshift.experiments.data.DataUnavailableError: no data could be had.
    """
    if config is not None and settings:
        raise TypeError(f"run_experiment() takes a Config or keyword settings, not both: {sorted(settings)}")
    config = config if config is not None else Config(**settings)  # type: ignore[arg-type]
    config.check()
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out={str(out)!r} is a file; choose a directory for the results")
    train, test, notice = prepare(config, MODELS)
    train_x, test_x = normalize(train.images, config.dataset), normalize(test.images, config.dataset)
    probe = train_x[: min(config.probe_size, len(train))]
    models = dict(zip(MODELS, reference_pair(seed=config.seed)))
    experiment = {
        "config": asdict(config),
        "data": {
            "dataset": config.dataset,
            "train": _describe(train),
            "test": _describe(test),
            "notice": notice,
        },
        "models": {name: _model_info(model) for name, model in models.items()},
        "seconds": {},
    }
    for name, model in models.items():
        print(str(model_table(model)), flush=True)
        started = time.perf_counter()
        train_model(model, name, (train_x, train.labels), (test_x, test.labels), probe, config, out / name,
                    notice=notice)
        experiment["seconds"][name] = round(time.perf_counter() - started, 1)
    (out / EXPERIMENT_FILE).write_text(json.dumps(experiment, indent=2))
    results.write_results(out, report=config.report)
    reminder = " (trained on offline fallback data: read the notice at its top)" if notice else ""
    print(f"results: {out / results.RESULTS_MD}{reminder}", flush=True)
    return out


def prepare(config: object, names: tuple[str, ...]) -> tuple[Split, Split, str | None]:
    """Refuse an out dir that holds a run in ``names``, load the splits, print the fallback notice, make the dir.

    ``config`` is an experiment config with ``out`` and the data settings; returns train, test and the notice.
    """
    out = Path(config.out)
    for name in names:
        if (out / name).exists():
            raise FileExistsError(f"out={str(out)!r} already holds a run ({out / name}); choose a new --out")
    train, test = load_splits(config.dataset, config.train_split, config.test_split, config.data_dir,
                              cache_dir=config.cache_dir, download=config.download)
    notice = data_notice(train, test)
    if notice:
        print(notice, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    return train, test, notice


def train_model(
    model: nn.Module,
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    probe: torch.Tensor,
    config: Config,
    store: Path,
    notice: str | None = None,
) -> covshift.Run:
    """Train ``model`` with SGD under a covshift tracker; log per-epoch loss and accuracy into the run.

    A data ``notice`` is stored with the run, so every report of it shows the notice at its top.

    The batch order comes from ``config.seed`` alone, so every model sees the same batches.
    Training loss and accuracy are averaged over the epoch's batches as they were trained on.
    """
    images, labels = train
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    order_rng = torch.Generator().manual_seed(config.seed)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    # A small model: every channel keeps its quantiles (sketch_channels=None), as in the published results.
    # Gradient ICS counts optimizer steps on its own and writes into the run (the tracker counts forwards);
    # gradients=True records ∂loss/∂(input) of the convolutions after the first (the images need no gradient).
    with covshift.attach(model, layers=nn.Conv2d, every=config.every, store=store, sketch_channels=None,
                         name=name, gradients=True) as tracker, \
            GradientICS(model, optimizer, F.cross_entropy, every=config.ics_every, layers=convs,
                        directory=store) as ics:
        tracker.probe(probe, every=config.probe_every)
        if notice:
            tracker.run.add_notice(notice)
        for epoch in range(1, config.epochs + 1):
            model.train()
            order = torch.randperm(len(labels), generator=order_rng)
            loss_sum = torch.zeros((), dtype=torch.float64)
            correct = torch.zeros((), dtype=torch.int64)
            seen = 0
            batches = range(0, len(labels), config.batch_size)
            bar = tqdm(batches, desc=f"{name} epoch {epoch}/{config.epochs}", unit="batch",
                       disable=not config.progress, leave=True)
            for start in bar:
                index = order[start : start + config.batch_size]
                x, y = images[index], labels[index]
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad()
                loss.backward()
                ics.batch(x, y)
                optimizer.step()
                loss_sum += loss.detach().double() * len(y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}",
                                refresh=False)
            test_loss, test_acc = evaluate(model, *test)
            tracker.run.log(
                tracker.current_step,
                epoch=epoch,
                train_loss=loss_sum.item() / seen,
                train_acc=correct.item() / seen,
                test_loss=test_loss,
                test_acc=test_acc,
            )
            bar.write(
                f"{name} epoch {epoch}: train loss {loss_sum.item() / seen:.4f} acc {correct.item() / seen:.4f}"
                f" | test loss {test_loss:.4f} acc {test_acc:.4f}"
            )
    return tracker.run


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode; its training flag is put back."""
    training = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    try:
        with torch.no_grad():
            for start in range(0, len(labels), EVAL_BATCH):
                logits = model(images[start : start + EVAL_BATCH])
                y = labels[start : start + EVAL_BATCH]
                loss += F.cross_entropy(logits, y, reduction="sum").double()
                correct += (logits.argmax(1) == y).sum()
    finally:
        model.train(training)
    return loss.item() / len(labels), correct.item() / len(labels)


def data_notice(train: Split, test: Split) -> str | None:
    """A banner that says which fallback data was used and how to use the real files, else None."""
    if not (train.fallback or test.fallback):
        return None
    reason = train.source.split(", because ", 1)[-1]
    files = ", ".join(f"{name}.gz" for base in ("train", "test") for name in SPLIT_FILES[base])
    bar = "!" * 78
    return "\n".join([
        bar,
        "DATA NOTICE: offline fallback data in use, not the official MNIST splits;",
        "accuracies are not comparable to full MNIST.",
        f"Why: {reason}.",
        f"train: {len(train)} digits ({_fallback_part(train, 'train')})",
        f"test: {len(test)} digits ({_fallback_part(test, 'test')})",
        f"To use the real files, pass --data-dir DIR with {files} (flat or in DIR/MNIST/raw/).",
        bar,
    ])


def _fallback_part(split: Split, argument: str) -> str:
    base = split.spec.split("[")[0]
    pool = FALLBACK_TRAIN if base == "train" else 5000 - FALLBACK_TRAIN
    return f"--{argument}-split {split.spec!r} of the fallback's {pool} {base} digits"


def _describe(split: Split) -> dict:
    counts = torch.bincount(split.labels, minlength=10).tolist()
    return {"split": split.spec, "examples": len(split), "source": split.source, "fallback": split.fallback,
            "class_counts": counts}


def _model_info(model: nn.Module) -> dict:
    table = model_table(model)
    return {
        "summary": str(table),
        "trainable_params": table.trainable,
        "non_trainable_params": table.non_trainable,
        "total_params": table.total,
    }
