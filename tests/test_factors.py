"""Drift factors by measure: σ-normalized and scale-free W1 and KS, against step 0, a later step and the previous one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import covshift
from covshift.experiments import factors


def drifting_run(store: Path, scale: float, name: str) -> covshift.Run:
    """Two linear layers; the second's input is ``scale`` × the same drifting signal in every run."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(6, 4) * scale)
        model[0].bias.zero_()
    gen = torch.Generator().manual_seed(0)
    with covshift.attach(model, every=1, store=store, name=name, sketch_channels=None) as tracker:
        for step in range(10):
            model(torch.randn(256, 4, generator=gen) * (1 + 0.1 * step) + 0.2 * step)
    return tracker.run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, covshift.Run]:
    root = tmp_path_factory.mktemp("factors")
    return {"wide": drifting_run(root / "wide", 1.0, "wide"), "tiny": drifting_run(root / "tiny", 1e-3, "tiny")}


def test_a_tiny_scale_changes_the_raw_factor_only(runs: dict[str, covshift.Run]) -> None:
    found = factors.compare_variants(runs, [("wide", "tiny")])["factors"]["wide/tiny"]["drift"]
    for key in ("w1_sigma", "ks", "w1_sigma_later", "w1_sigma_previous"):
        assert found[key]["mean"] == pytest.approx(1.0, rel=1e-3), key
        assert found[key]["median"] == pytest.approx(1.0, rel=1e-3), key
    for key in ("w1_raw", "w1_raw_later", "w1_raw_previous"):
        assert found[key]["mean"] == pytest.approx(1000, rel=1e-3), key
        assert found[key]["lower"] == 1 and found[key]["layers"] == 1


def test_the_later_reference_is_the_recorded_step_at_a_fifth_of_training(runs: dict[str, covshift.Run]) -> None:
    assert factors.later_step(runs["wide"]) == 2  # steps 0..9: the first at or after 9 / 5
    later = factors.layer_drift(runs["wide"], factors.MEASURES[3], "mean", 2)
    initial = factors.layer_drift(runs["wide"], factors.MEASURES[0], "mean", 2)
    assert list(later.index) == list(initial.index) == ["0", "1"]
    assert (later < initial).all()  # drift grows with the step: a later reference sees less of it


def test_gradient_ics_ratios_count_layers_and_state_cosines() -> None:
    def table(relative: float, raw: float, cosine: float) -> dict:
        return {"h": {"grad_norm": raw / relative, "ics_norm": raw, "relative": relative, "cosine": cosine}}

    ratios = factors.ics_ratios(table(0.2, 0.4, 0.99), table(0.6, 0.1, 0.7))
    assert ratios["relative"] == pytest.approx(3.0) and ratios["raw"] == pytest.approx(0.25)
    assert (ratios["lower_relative"], ratios["lower_raw"], ratios["layers"]) == (0, 1, 1)
    sentence = factors.ics_sentence(ratios, "plain", "bn")
    assert "3.00× by ‖G − G'‖/‖G‖ (0 of 1 layers lower), 0.25× by the raw ‖G − G'‖ (1 of 1 lower)" in sentence
    assert factors.ics_ratios({}, table(0.6, 0.1, 0.7))["layers"] == 0


def test_input_gradient_scale_spread_across_layers_and_change_over_training(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(4) * 10)  # layer 1's input gradient is 10× layer 2's, channel by channel
    gen = torch.Generator().manual_seed(0)
    with covshift.attach(model, every=1, store=tmp_path / "run", gradients=True) as tracker:
        for _ in range(3):
            (model(torch.randn(64, 4, generator=gen)) ** 2).sum().div(2).backward()
    scale = factors.input_gradients(tracker.run)
    assert scale is not None and (scale["layers"], scale["steps"]) == (2, 3)  # the data layer has no gradient
    assert scale["spread"] == pytest.approx(10.0, rel=1e-5)
    assert scale["change"] == pytest.approx(1.0, rel=0.5)  # nothing trains: the same scale, new batches
    assert factors.input_gradients(covshift.load(tmp_path / "run")) == scale
