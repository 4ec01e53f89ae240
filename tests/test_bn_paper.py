"""The bn-paper and noisy-bn experiments end to end on tiny synthetic data (no /work/shared, no download)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import covshift
from covshift.cli import main
from covshift.experiments import bn_paper, noisy_bn


@pytest.fixture(scope="module")
def data_dir(quadrant_mnist: Callable[[int, int], Path]) -> Path:
    """A torchvision-layout MNIST folder with 160 train and 40 test digits: the label is the bright quadrant."""
    return quadrant_mnist(160, 40)


def tiny(data_dir: Path, out: Path) -> list[str]:
    return ["--steps", "8", "--batch-size", "20", "--every", "4", "--eval-every", "4", "--probe-size", "40",
            "--null-every", "8", "--null-splits", "3", "--ics-every", "4", "--data-dir", str(data_dir),
            "--no-download", "--no-progress", "--out", str(out)]


@pytest.fixture(scope="module")
def noisy_out(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("noisy") / "out"
    assert main(["experiment", "noisy-bn", *tiny(data_dir, out)]) == 0
    return out


def test_noisy_bn_trains_three_networks_and_states_each_view(noisy_out: Path) -> None:
    for name in ("plain", "batchnorm", "noisy"):
        run = covshift.load(noisy_out / name)
        assert {"fc1", "sig3", "out"} <= set(run.layers["layer"])
        assert list(run.curves()["step"]) == [0, 4, 7]
        assert (noisy_out / name / "gradients.jsonl").exists() and (noisy_out / name / "null_floor.jsonl").exists()
    summary = json.loads((noisy_out / "results.json").read_text())
    assert set(summary["verdicts"]) == {"batchnorm", "noisy"}
    assert set(summary["gradient_ics"]["plain"]) == {"fc2", "fc3", "out"}
    md = (noisy_out / "results.md").read_text()
    assert "by the channel median" in md and "Gradient ICS" in md and "Calibration" in md
    assert (noisy_out / "figure1.png").stat().st_size > 10_000
    assert (noisy_out / "gradient_ics.png").stat().st_size > 10_000


def test_bn_paper_records_the_last_sigmoid_units_and_shares_initial_weights(data_dir: Path, tmp_path: Path) -> None:
    out = bn_paper.run_experiment(bn_paper.Config(
        steps=4, batch_size=20, every=3, eval_every=3, probe_size=40, null_every=4, null_splits=2, ics_every=4,
        data_dir=str(data_dir), download=False, progress=False, out=str(tmp_path / "paper")))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["batchnorm", "plain"]
    units = bn_paper.unit_percentiles(covshift.load(out / "plain"), "sig3")
    assert sorted(set(units["channel"])) == [0, 1, 2] and sorted(set(units["step"])) == [0, 3]
    assert (units["q0.15"] <= units["q0.5"]).all() and (units["q0.5"] <= units["q0.85"]).all()
    plain, bn = bn_paper.mlp("plain", 1), bn_paper.mlp("batchnorm", 1)
    assert torch.equal(plain.fc2.weight, bn.fc2.weight)
    with pytest.raises(FileExistsError, match="already holds a run"):
        bn_paper.run_experiment(steps=2, data_dir=str(data_dir), download=False, out=str(out))


def test_noisy_batchnorm_redraws_per_step_and_is_its_expectation_in_eval() -> None:
    layer = bn_paper.NoisyBatchNorm(5, mean_range=1.0, scale_max=3.0, seed=0)
    x = torch.randn(32, 5)
    first = layer(x)
    assert torch.equal(layer(x), first)  # fixed within a step
    layer.resample()
    assert not torch.allclose(layer(x), first)
    assert ((layer.scale >= 1) & (layer.scale <= 3)).all() and (layer.shift.abs() <= 1).all()
    layer.eval()
    assert torch.allclose(layer(x), layer.bn(x) * 2.0)
    assert noisy_bn.VARIANTS == ("plain", "batchnorm", "noisy")
    with pytest.raises(ValueError, match="variant must be one of"):
        bn_paper.mlp("wide")
