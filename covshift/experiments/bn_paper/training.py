"""Training the Figure 1 networks under covshift, with the null noise floor and gradient ICS beside it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import covshift
from covshift.checks import check_int
from covshift.experiments.bn_paper.model import VARIANTS, NoisyBatchNorm, mlp
from covshift.experiments.bn_paper.results import RESULTS_MD, write_results
from covshift.experiments.data import DATASETS, normalize
from covshift.experiments.seeds import SEEDS_JSON, SEEDS_MD, rewrite_seeds, run_seeds
from covshift.experiments.mnist_bn import (
    EXPERIMENT_FILE,
    add_data_arguments,
    evaluate,
    prepare,
)
from covshift.science.gradient_ics import GradientICS
from covshift.science.null_floor import NullFloor


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
    seeds: int = 1
    progress: bool = True

    def check(self) -> None:
        for name in ("steps", "batch_size", "every", "eval_every", "null_every", "null_splits", "ics_every", "seeds"):
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
    parser.add_argument("--seeds", type=int, default=d.seeds,
                        help="run seeds --seed, --seed+1, ... into OUT/seed-<seed>/ and write OUT/seeds.md: each "
                             "number's median over seeds, min-max and 95%% bootstrap interval (default %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress output")
    parser.add_argument("--from-runs", action="store_true",
                        help="do not train: recompute results.md, results.json and the figures from the runs in "
                             "--out (of every seed and seeds.md, when --out holds a --seeds run)")


def run_from_args(args: argparse.Namespace) -> Path:
    """Run the experiment from parsed options (over ``--seeds`` seeds when more than one); return the out dir."""
    if getattr(args, "from_runs", False):
        out = Path(args.out)
        if (out / SEEDS_JSON).is_file():
            rewrite_seeds(out, write_results)
            print(f"over seeds: {out / SEEDS_MD}", flush=True)
        else:
            write_results(out)
            print(f"results: {out / RESULTS_MD}", flush=True)
        return out
    config = Config(**{f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)})
    if config.seeds > 1:
        experiment = "noisy-bn" if "noisy" in config.variants else "bn-paper"
        out = run_seeds(lambda one: run_experiment(dataclasses.replace(one, seeds=1)), config, config.seeds,
                        experiment)
        print(f"over seeds: {out / SEEDS_MD}", flush=True)
        return out
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
        train_model(model, name, (train_x, train.labels), (test_x, test.labels), probe, config, out / name,
                    notice=notice)
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
    notice: str | None = None,
) -> covshift.Run:
    """SGD for ``config.steps`` steps under covshift, null floor and gradient ICS; the batch order is the seed's.

    A data ``notice`` is stored with the run, so every report of it shows the notice at its top.
    """
    images, labels = train
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    order_rng = torch.Generator().manual_seed(config.seed)
    linears = [n for n, m in model.named_children() if isinstance(m, nn.Linear)]
    recorded = [n for n, m in model.named_children() if isinstance(m, (nn.Linear, nn.Sigmoid))]
    order = torch.randperm(len(labels), generator=order_rng)
    position = 0
    started = time.perf_counter()
    # Every unit keeps its percentiles (sketch_channels=None): the paper's view is of single units.
    # the global RNG is seeded inside and put back after (fork_rng)
    with torch.random.fork_rng(devices=[]), covshift.attach(
            model, optimizer=optimizer, layers=recorded, every=config.every, store=store, sketch_channels=None,
            name=name, gradients=True) as tracker:
        tracker.probe(probe, every=config.eval_every)
        if notice:
            tracker.run.add_notice(notice)
        tracker.add(NullFloor(model, probe, optimizer=optimizer, every=config.null_every, layers=recorded,
                              size=config.batch_size, splits=config.null_splits))
        ics = tracker.add(GradientICS(model, optimizer, F.cross_entropy, every=config.ics_every, layers=linears))
        # noisy BN draws the next step's noise after the measurements of this one (hooks run in order)
        noisy = [m for m in model.modules() if isinstance(m, NoisyBatchNorm)]
        resample = optimizer.register_step_post_hook(lambda *_: [m.resample() for m in noisy]) if noisy else None
        model.train()
        torch.manual_seed(config.seed)  # noisy_iid's per-sample noise comes from the global RNG: the seed's
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
        if resample is not None:
            resample.remove()
    return tracker.run
