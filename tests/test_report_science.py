"""report() draws what a run holds beyond drift: gradient ICS and the null noise floor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import covshift
from covshift.science.gradient_ics import GradientICS, load_gradient_ics
from covshift.science.null_floor import NullFloor, load_null_floor
from covshift.reporting.build import report
from covshift.reporting.data import ReportData
from covshift.reporting.sections import build_sections

STEPS = 12


def record_with_science(directory: Path, name: str, seed: int) -> covshift.Run:
    """A small MLP trained ``STEPS`` SGD steps with drift, a null floor (every 4) and gradient ICS (every 3)."""
    torch.manual_seed(seed)
    data = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    probe = torch.randn(64, 8, generator=data)
    with covshift.attach(model, optimizer=opt, every=1, store=directory, name=name) as tracker:
        null = NullFloor(model, probe, optimizer=opt, every=4, directory=tracker.run.directory, size=16, splits=20,
                         metric="wasserstein")
        with GradientICS(model, opt, F.cross_entropy, every=3, directory=tracker.run.directory) as ics:
            for _ in range(STEPS):
                x, y = torch.randn(16, 8, generator=data), torch.randint(0, 4, (16,), generator=data)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                ics.batch(x, y)
                opt.step()
        null.close()
    return covshift.load(directory)


@pytest.fixture(scope="module")
def science(tmp_path_factory: pytest.TempPathFactory) -> tuple[covshift.Run, covshift.Run]:
    root = tmp_path_factory.mktemp("science")
    return record_with_science(root / "a", "mlp", 0), record_with_science(root / "b", "mlp-2", 1)


def _sections(runs, labels, metrics=("wasserstein",)):
    data = ReportData.compute(list(runs), list(metrics), reference="initial", source="train", channel=None)
    shown = build_sections(data, list(metrics), reference="initial", max_points=400,
                           channel=None, source="train")
    return {section.name: section for section in shown}


def test_a_run_with_gradient_ics_and_a_null_floor_gets_both_drawn_and_explained(science, tmp_path):
    run = science[0]
    page = report(run, tmp_path, metrics="wasserstein").read_text()
    assert (tmp_path / "gradient-ics.png").exists() and "<h2>Gradient ICS</h2>" in page
    for words in ("null 95th percentile", "95% of the drift that sampling alone produces lies below",
                  "how much a layer&#x27;s gradient G changes"):
        assert words in page, words
    drawn = _sections([run], ["mlp"])
    null = load_null_floor(run.directory)
    for ax in drawn["drift"].figure.axes:
        layer = ax.get_ylabel().removeprefix("layer ")
        (line,) = [line for line in ax.get_lines() if line.get_label() == "mlp null 95th pct"]
        expected = null[(null["layer"] == layer) & (null["metric"] == "wasserstein")].sort_values("step")
        assert line.get_linestyle() == ":" and line.get_drawstyle() == "steps-post"
        np.testing.assert_array_equal(line.get_xdata()[:-1], expected["step"])  # held to the last drift step
        np.testing.assert_allclose(line.get_ydata()[:-1], expected["null_q95"])
        assert line.get_xdata()[-1] == STEPS - 1


def test_gradient_ics_is_drawn_per_layer_with_runs_side_by_side(science, runs):
    drawn = _sections([*science, runs[0]], ["mlp", "mlp-2", "plain"])
    fig = drawn["gradient-ics"].figure
    grid = np.array(fig.axes).reshape(2, 3)
    assert [ax.get_ylabel() for ax in grid[:, 0]] == ["‖G − G'‖₂", "cos∠(G, G')"]
    for col, run in enumerate(science):
        ics = load_gradient_ics(run.directory)
        for ax, value in zip(grid[:, col], ("ics_norm", "cosine")):
            lines = {line.get_label(): line for line in ax.get_lines()}
            assert sorted(lines) == ["0", "2"]  # the two Linear layers
            for layer, line in lines.items():
                rows = ics[ics["layer"] == layer]
                np.testing.assert_array_equal(line.get_xdata(), rows["step"])
                np.testing.assert_allclose(line.get_ydata(), rows[value])
    assert [t.get_text() for t in grid[0, 2].texts] == ["no gradient ICS recorded"]


def test_a_run_without_them_reports_as_before(runs, tmp_path):
    page = report(runs[1], tmp_path, metrics="wasserstein").read_text()
    assert not (tmp_path / "gradient-ics.png").exists()
    assert "Gradient ICS" not in page and "null 95th percentile" not in page
    drawn = _sections([runs[1]], ["bn"])
    assert "gradient-ics" not in drawn
    assert not [line for ax in drawn["drift"].figure.axes for line in ax.get_lines() if line.get_linestyle() == ":"]
