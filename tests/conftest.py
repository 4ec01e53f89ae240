"""Shared fixtures: small real runs, recorded by training tiny networks for a few steps."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import covshift

STEPS = 24
BATCH = 32
PROBE_EVERY = 4


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 3-class problem on 1×8×8 images: the label is the brightest third of the image."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS * BATCH + 32, 1, 8, 8, generator=gen)
    thirds = torch.stack([x[:, 0, :, :3].mean((1, 2)), x[:, 0, :, 3:5].mean((1, 2)), x[:, 0, :, 5:].mean((1, 2))], 1)
    return x, thirds.argmax(1)


def _model(batchnorm: bool) -> nn.Module:
    """Layers ``conv``, (``bn``,) ``fc``: the shared layers have the same names in both variants."""
    layers = {"conv": nn.Conv2d(1, 4, 3, padding=1)}
    if batchnorm:
        layers["bn"] = nn.BatchNorm2d(4)
    layers.update(relu=nn.ReLU(), pool=nn.AvgPool2d(2), flatten=nn.Flatten(), fc=nn.Linear(4 * 4 * 4, 3))
    return nn.Sequential(OrderedDict(layers))


def record_run(directory: Path, *, batchnorm: bool, name: str, steps: int = STEPS, curves: bool = True) -> covshift.Run:
    """Train a tiny CNN for ``steps`` SGD steps with covshift attached (and a probe) and store the run."""
    torch.manual_seed(0)
    x, y = _data(0)
    probe_x, train_x, train_y = x[:32], x[32:], y[32:]
    model = _model(batchnorm)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with covshift.attach(model, every=1, store=directory, name=name) as tracker:
        tracker.probe(probe_x, every=PROBE_EVERY)
        for step in range(steps):
            batch = slice((step * BATCH) % len(train_x), (step * BATCH) % len(train_x) + BATCH)
            logits = model(train_x[batch])
            loss = nn.functional.cross_entropy(logits, train_y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if curves and step % 4 == 3:
                acc = (logits.argmax(1) == train_y[batch]).float().mean()
                tracker.run.log(step, epoch=step // 8, train_loss=loss.item(), train_acc=acc.item(),
                                test_loss=loss.item() * 1.1, test_acc=acc.item() * 0.9)
    return covshift.load(directory)


@pytest.fixture(scope="session")
def run_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two stored runs of the same tiny CNN, without and with BatchNorm."""
    root = tmp_path_factory.mktemp("runs")
    record_run(root / "plain", batchnorm=False, name="plain")
    record_run(root / "bn", batchnorm=True, name="bn", curves=False)
    return root / "plain", root / "bn"


@pytest.fixture(scope="session")
def runs(run_dirs: tuple[Path, Path]) -> tuple[covshift.Run, covshift.Run]:
    return covshift.load(run_dirs[0]), covshift.load(run_dirs[1])
