"""Measurements added to a tracker (``tracker.add``): the tracker's steps, its run, its warnings, its lifetime."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import covshift
from covshift.faults import CovshiftWarning
from covshift.reporting.data import ReportData
from covshift.science.gradient_ics import GradientICS
from covshift.science.null_floor import NullFloor

STEPS = 7


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.Generator().manual_seed(seed)


def _train(model, opt, data, ics=None, steps=STEPS):
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=data), torch.randint(0, 3, (16,), generator=data)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if ics is not None:
            ics.batch(x, y)
        opt.step()


def test_added_measurements_store_their_rows_in_the_run_at_the_trackers_steps(tmp_path):
    model, opt, data = _setup()
    probe = torch.randn(32, 6, generator=data)
    with covshift.attach(model, optimizer=opt, every=1, store=tmp_path / "run") as tracker:
        tracker.set_step(100)  # a resumed run: the measurements follow the tracker's numbering
        null = tracker.add(NullFloor(model, probe, optimizer=opt, every=3, size=8, splits=5, metric="wasserstein"))
        ics = tracker.add(GradientICS(model, opt, F.cross_entropy, every=2))
        _train(model, opt, data, ics)
    run = covshift.load(tmp_path / "run")
    assert sorted(run.table("null_floor")["step"].unique()) == [102, 105]
    assert sorted(run.table("gradients")["step"].unique()) == [100, 102, 104, 106]
    assert run.table("null_floor").equals(null.frame())
    assert sorted(run.stats()["step"].unique()) == list(range(100, 100 + STEPS))


def test_a_measurement_made_before_attach_numbers_steps_alike(tmp_path):
    """Its optimizer hooks then run before the tracker's: the step index must not shift by one."""
    model, opt, data = _setup()
    ics = GradientICS(model, opt, F.cross_entropy, every=2)
    with covshift.attach(model, optimizer=opt, every=1, store=tmp_path / "run") as tracker:
        tracker.add(ics)
        _train(model, opt, data, ics)
    assert sorted(covshift.load(tmp_path / "run").table("gradients")["step"].unique()) == [0, 2, 4, 6]


def test_detach_closes_the_added_measurements(tmp_path):
    model, opt, data = _setup()
    tracker = covshift.attach(model, optimizer=opt, every=1, store=tmp_path / "run")
    ics = tracker.add(GradientICS(model, opt, F.cross_entropy, every=1))
    _train(model, opt, data, ics, steps=2)
    tracker.detach()
    rows = len(ics.rows)
    _train(model, opt, data, ics, steps=2)
    assert rows == 2 * 2 and len(ics.rows) == rows  # two linear layers a step; nothing after detach


def test_a_failing_measurement_warns_through_covshift_once_and_training_goes_on(tmp_path):
    model, opt, data = _setup()
    with covshift.attach(model, optimizer=opt, every=1, store=tmp_path / "run") as tracker:
        tracker.add(GradientICS(model, opt, F.cross_entropy, every=1))  # never given a batch
        with pytest.warns(CovshiftWarning, match="call ics.batch") as caught:
            _train(model, opt, data)
    assert sum("ics.batch" in str(w.message) for w in caught) == 1


def test_a_measurement_of_another_model_or_optimizer_is_refused(tmp_path):
    model, opt, _ = _setup()
    other, other_opt, _ = _setup(1)
    with covshift.attach(model, optimizer=opt, store=tmp_path / "run") as tracker:
        with pytest.raises(ValueError, match="another model"):
            tracker.add(GradientICS(other, other_opt, F.cross_entropy))
        with pytest.raises(ValueError, match="same one"):
            tracker.add(GradientICS(model, other_opt, F.cross_entropy))
        with pytest.raises(ValueError, match="leave directory= out"):
            tracker.add(GradientICS(model, opt, F.cross_entropy, directory=tmp_path / "elsewhere"))


def test_the_report_reads_the_measurements_from_the_run(tmp_path):
    model, opt, data = _setup()
    probe = torch.randn(32, 6, generator=data)
    with covshift.attach(model, optimizer=opt, every=1, store=tmp_path / "run") as tracker:
        tracker.add(NullFloor(model, probe, optimizer=opt, every=3, size=8, splits=5, metric="wasserstein"))
        ics = tracker.add(GradientICS(model, opt, F.cross_entropy, every=2))
        _train(model, opt, data, ics)
    run = covshift.load(tmp_path / "run")
    data = ReportData.compute([run], ["wasserstein"], reference="initial", source="train", channel=None)
    assert data.nulls[0]["step"].tolist() == run.table("null_floor")["step"].tolist()
    assert data.gradients[0]["ics_norm"].tolist() == run.table("gradients")["ics_norm"].tolist()
