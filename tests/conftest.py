"""Shared fixtures: small real runs, recorded by training tiny networks for a few steps."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import covshift

STEPS = 24
BATCH = 32
PROBE_EVERY = 4
HELD_OUT = 32  # examples for the probe and the test curves


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 3-class problem on 1×8×8 images: the label is the brightest of three column bands."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS * BATCH + HELD_OUT, 1, 8, 8, generator=gen)
    bands = torch.stack([x[..., :3].mean((1, 2, 3)), x[..., 3:5].mean((1, 2, 3)), x[..., 5:].mean((1, 2, 3))], 1)
    return x, bands.argmax(1)


def _model(batchnorm: bool) -> nn.Module:
    """Layers ``conv``, (``bn``,) ``fc``: the shared layers have the same names in both variants."""
    layers = {"conv": nn.Conv2d(1, 4, 3, padding=1)}
    if batchnorm:
        layers["bn"] = nn.BatchNorm2d(4)
    layers.update(relu=nn.ReLU(), pool=nn.AvgPool2d(2), flatten=nn.Flatten(), fc=nn.Linear(4 * 4 * 4, 3))
    return nn.Sequential(OrderedDict(layers))


def record_run(directory: Path, *, batchnorm: bool, name: str, curves: bool = True) -> covshift.Run:
    """Train a tiny CNN for ``STEPS`` SGD steps with covshift attached (and a probe) and store the run.

    With ``curves``, every 4th step logs train and test (held-out) loss and accuracy.
    """
    torch.manual_seed(0)  # the same convolution weights with and without BatchNorm
    x, y = _data(0)
    test_x, test_y, train_x, train_y = x[:HELD_OUT], y[:HELD_OUT], x[HELD_OUT:], y[HELD_OUT:]
    model = _model(batchnorm)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with covshift.attach(model, every=1, store=directory, name=name) as tracker:
        tracker.probe(test_x, every=PROBE_EVERY)
        for step in range(STEPS):
            batch = slice(step * BATCH, (step + 1) * BATCH)
            logits = model(train_x[batch])
            loss = nn.functional.cross_entropy(logits, train_y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if curves and step % 4 == 3:
                model.eval()  # eval-mode forwards are not recorded
                with torch.no_grad():
                    test_logits = model(test_x)
                model.train()
                tracker.run.log(
                    step,
                    train_loss=loss.item(),
                    train_acc=(logits.argmax(1) == train_y[batch]).float().mean().item(),
                    test_loss=nn.functional.cross_entropy(test_logits, test_y).item(),
                    test_acc=(test_logits.argmax(1) == test_y).float().mean().item(),
                )
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


@pytest.fixture(scope="session")
def quadrant_mnist(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, int], Path]:
    """Write a torchvision-layout MNIST folder of ``train`` and ``test`` digits; the label is the bright quadrant."""
    from covshift.experiments.data import SPLIT_FILES, write_idx

    def make(train: int, test: int) -> Path:
        root = tmp_path_factory.mktemp("data")
        raw = root / "MNIST" / "raw"
        raw.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for split, n in (("train", train), ("test", test)):
            labels = rng.integers(0, 4, size=n).astype(np.uint8)
            images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
            for quadrant in range(4):
                rows, cols = divmod(quadrant, 2)
                images[labels == quadrant, rows * 14 : rows * 14 + 14, cols * 14 : cols * 14 + 14] += 180
            image_file, label_file = SPLIT_FILES[split]
            write_idx(raw / f"{image_file}.gz", images)
            write_idx(raw / f"{label_file}.gz", labels)
        return root

    return make
