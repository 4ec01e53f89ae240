"""The bn-paper and noisy-bn experiments end to end on tiny synthetic data (no /work/shared, no download)."""

from __future__ import annotations

import argparse
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


def test_noisy_bn_trains_four_networks_and_states_each_view(noisy_out: Path) -> None:
    for name in ("plain", "batchnorm", "noisy", "noisy_iid"):
        run = covshift.load(noisy_out / name)
        assert {"fc1", "sig3", "out"} <= set(run.layers["layer"])
        assert list(run.curves()["step"]) == [0, 4, 7]
        assert (noisy_out / name / "gradients.jsonl").exists() and (noisy_out / name / "null_floor.jsonl").exists()
    summary = json.loads((noisy_out / "results.json").read_text())
    assert set(summary["verdicts"]) == {"batchnorm", "noisy", "noisy_iid"}
    assert set(summary["gradient_ics"]["plain"]) == {"fc2", "fc3", "out"}
    assert list(summary["factors"]) == ["plain/batchnorm", "plain/noisy", "plain/noisy_iid", "batchnorm/noisy",
                                        "batchnorm/noisy_iid"]
    drift = summary["factors"]["batchnorm/noisy_iid"]["drift"]
    assert set(drift) == {"w1_sigma", "w1_raw", "ks", "w1_sigma_later", "w1_raw_later", "w1_sigma_previous",
                          "w1_raw_previous"}
    assert drift["w1_raw"]["layers"] == 6  # sig1, fc2, sig2, fc3, sig3, out: all but fc1, which reads the data
    assert summary["later_step"] == {name: 4 for name in ("plain", "batchnorm", "noisy", "noisy_iid")}
    head = summary["headline"]
    assert head["test_acc:noisy_iid"] == summary["accuracy"]["noisy_iid"]["test_acc"]
    assert head["drift:ks:median:plain/batchnorm"] == summary["factors"]["plain/batchnorm"]["drift"]["ks"]["median"]
    assert head["ics:raw:plain/noisy"] == summary["factors"]["plain/noisy"]["gradient_ics"]["raw"]
    scale = summary["input_gradients"]["batchnorm"]  # every recorded layer's input but the data's
    assert (scale["layers"], scale["steps"]) == (6, 2) and head["input_grad:spread:batchnorm"] == scale["spread"]
    units = bn_paper.unit_percentiles(covshift.load(noisy_out / "plain"), "sig3")
    width = (units["q0.85"] - units["q0.15"]).groupby(units["step"]).mean()
    assert list(width.index) == [0, 4, 8]  # probe steps: every 4, and the closing one; the last fifth: step 8
    assert summary["bands"]["plain"] == pytest.approx(
        {"first": width[0], "last": width[8], "growth": width[8] / width[0]})
    assert head["band:growth:plain"] == summary["bands"]["plain"]["growth"]
    md = (noisy_out / "results.md").read_text()
    assert "by the channel median" in md and "Gradient ICS" in md and "Calibration" in md
    assert "| raw W1 vs step 0 |" in md and "by the raw ‖G − G'‖" in md and "| noisy_iid | 6 |" in md
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
    assert noisy_bn.VARIANTS == ("plain", "batchnorm", "noisy", "noisy_iid")
    with pytest.raises(ValueError, match="variant must be one of"):
        bn_paper.mlp("wide")


def test_per_sample_noise_is_iid_per_activation_with_the_steps_mean_and_spread() -> None:
    layer = bn_paper.NoisyBatchNorm(4, mean_range=1.0, scale_max=3.0, seed=0, per="sample")
    x = torch.randn(20_000, 4)
    torch.manual_seed(0)
    noise = layer(x) - layer.bn(x)
    # per unit: mean the step's shift, spread the step's scale; examples and units independent
    assert torch.allclose(noise.mean(0), layer.shift, atol=0.05)
    assert torch.allclose(noise.std(0), layer.scale, rtol=0.03)
    assert torch.corrcoef(noise.T).sub(torch.eye(4)).abs().max() < 0.03
    same = layer(x[:1].expand(8, 4).contiguous()) - layer.bn(x[:1].expand(8, 4).contiguous())
    assert same.std(0).min() > 0  # the same input gets different noise in every example
    before = layer.shift.clone()
    layer.resample()
    assert not torch.equal(layer.shift, before)  # the distribution changes at every step
    torch.manual_seed(1)
    first = layer(x[:8])
    torch.manual_seed(1)
    assert torch.equal(layer(x[:8]), first)  # the global RNG: replayed alike by gradient ICS
    layer.eval()
    assert torch.equal(layer(x), layer.bn(x))  # its expectation
    step = bn_paper.NoisyBatchNorm(4, seed=0)
    assert torch.equal(step(x[:1].expand(8, 4)).std(0), torch.zeros(4))  # per step: one draw for the batch
    assert isinstance(bn_paper.mlp("noisy_iid", 1).bn2, bn_paper.NoisyBatchNorm)
    assert bn_paper.mlp("noisy_iid", 1).bn2.per == "sample" and bn_paper.mlp("noisy", 1).bn2.per == "step"
    with pytest.raises(ValueError, match="per must be 'step' or 'sample'"):
        bn_paper.NoisyBatchNorm(4, per="unit")


def test_bn_paper_over_seeds_states_each_number_over_them(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "seeds"
    assert main(["experiment", "bn-paper", *tiny(data_dir, out), "--seeds", "2", "--seed", "4"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["seed-4", "seed-5", "seeds.json", "seeds.md"]
    content = json.loads((out / "seeds.json").read_text())
    per_seed = [json.loads((out / f"seed-{s}" / "results.json").read_text())["headline"] for s in (4, 5)]
    key = "drift:w1_raw:median:plain/batchnorm"
    assert content["values"][key] == [h[key] for h in per_seed]
    assert content["spread"][key]["median"] == pytest.approx(sum(h[key] for h in per_seed) / 2)
    assert content["accuracy"]["test_acc:batchnorm"]["se"] >= 0
    assert per_seed[0] != per_seed[1]  # the seeds differ
    assert "--seed 4" in content["command"] and content["command"].endswith("--seeds 2")
    before = (out / "seeds.md").read_text()
    (out / "seeds.md").unlink()
    (out / "seed-5" / "results.json").unlink()
    assert main(["experiment", "bn-paper", "--from-runs", "--out", str(out)]) == 0  # recomputed, not trained
    assert (out / "seeds.md").read_text() == before
    with pytest.raises(FileExistsError, match="already holds"):
        bn_paper.run_from_args(argparse.Namespace(**{**vars(bn_paper.Config(out=str(out), seed=4)), "seeds": 2}))
