"""The callbacks' drift scalars: the newest step only, computed from the steps its reference needs,
equal to covshift.drift over the whole run."""

import pytest
import torch

import covshift
from covshift.integrations._scalars import DriftScalars


@pytest.fixture(scope="module")
def tracker():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    tracker = covshift.attach(model, optimizer=opt, every=2)
    for step in range(9):
        model(torch.randn(32, 3) + 0.2 * step).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    yield tracker
    tracker.detach()


@pytest.mark.parametrize("reference", ["initial", "previous", 2, "rolling:2"])
def test_newest_step_matches_drift_of_the_whole_run(tracker, reference):
    scalars = DriftScalars(["wasserstein", "ks"], reference)
    step, values = scalars.newest(tracker.run)
    assert step == 8
    full = covshift.drift(tracker.run, ["wasserstein", "ks"], reference=reference)
    full = full[full.step == 8]
    for metric in ("wasserstein", "ks"):
        rows = full[full.metric == metric]
        for layer, value in zip(rows.layer.astype(str), rows.value):
            assert values[f"covshift/{metric}/{layer}"] == pytest.approx(value)
        assert values[f"covshift/{metric}/layer_mean"] == pytest.approx(rows.value.mean())
    assert scalars.newest(tracker.run) is None  # each step once


def test_a_failure_warns_once_and_stops_logging(tracker):
    scalars = DriftScalars("wasserstein", reference=999)
    with pytest.warns(covshift.faults.CovshiftWarning, match="could not compute drift"):
        assert scalars.newest(tracker.run) is None
    assert scalars.newest(tracker.run) is None


def test_per_layer_false_keeps_the_mean(tracker):
    _, values = DriftScalars("wasserstein", per_layer=False).newest(tracker.run)
    assert list(values) == ["covshift/wasserstein/layer_mean"]
