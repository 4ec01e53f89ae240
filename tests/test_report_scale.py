"""report() of a deep model: an overview of every layer, detail for a few, no PNG over MAX_HEIGHT_PX."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_report import grid_pixels, png_size
from torch import nn

import covshift
from covshift.reporting import heatmap as overview
from covshift.reporting import sections
from covshift.defaults import DEFAULT_TOP
from covshift.reporting.text import fmt
from covshift.reporting.panels import (
    DPI,
    HEATMAP_ROWS_PER_PAGE,
    INCH_PER_ROW,
    MAX_HEIGHT_PX,
    PANEL_SIZE,
    ROWS_PER_PAGE,
)
from covshift.reporting.build import report
from covshift.reporting.data import ReportData
from covshift.reporting.sections import build_sections

METRICS = ("wasserstein", "mean_shift", "std_ratio")
DEPTH = 120
ASKED = ["5", "17"]


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory: pytest.TempPathFactory) -> covshift.Run:
    """120 orthogonal Linear(4, 4) layers (the signal neither dies nor blows up), 5 SGD steps, all recorded."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(DEPTH)])
    for layer in model:
        nn.init.orthogonal_(layer.weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    directory = tmp_path_factory.mktemp("deep") / "run"
    with covshift.attach(model, every=1, store=directory, name="deep"):
        for _ in range(5):
            loss = model(torch.randn(32, 4)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return covshift.load(directory)


@pytest.fixture(scope="module")
def deep_report(deep_run: covshift.Run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return report(deep_run, tmp_path_factory.mktemp("deep-report"), layers=ASKED, progress=False)


def expected_top(run: covshift.Run, k: int = DEFAULT_TOP) -> pd.Series:
    """The k layers of the largest mean W1 drift over the recorded steps, from covshift.metrics.engine itself."""
    w1 = covshift.drift(run, "wasserstein")
    return w1.groupby(w1["layer"].astype(str))["value"].mean().sort_values(ascending=False).iloc[:k]


def test_every_png_of_a_120_layer_report_is_within_the_height_limit(deep_report):
    out = deep_report.parent
    sizes = {p.name: png_size(p) for p in out.glob("*.png")}
    assert sizes == {
        "heatmap.png": (400, round((DEPTH * INCH_PER_ROW + 1.0) * DPI)),  # one row per layer
        "percentiles.png": grid_pixels(len(ASKED) + 8, 1),
        "drift.png": grid_pixels(len(ASKED) + 8, len(METRICS)),
        "channels.png": grid_pixels(len(METRICS), 2),
    }
    assert max(height for _, height in sizes.values()) <= MAX_HEIGHT_PX == 4000


def test_the_overview_lists_the_top_layers_in_drift_order(deep_report, deep_run):
    top = expected_top(deep_run)
    page = deep_report.read_text()
    table = re.search(r"<table class=layers>.*?</table>", page, re.S).group(0)
    rows = re.findall(r"<tr[^>]*><td>([^<]*)</td><td>([^<]*)</td>", table)
    assert [name for name, _ in rows] == list(top.index)
    assert [value for _, value in rows] == [fmt(v) for v in top]
    assert (f"The 8 of {DEPTH} layers that drift most by mean W1 (× σ_ref) drift over the recorded steps "
            "(the largest of the runs), most first.") in page
    assert f"the layers asked for with layers= ({', '.join(ASKED)}); the other {DEPTH - 10} layers" in page


def test_detail_figures_are_drawn_for_the_top_layers_and_the_layers_asked_for_only(deep_run):
    top = expected_top(deep_run)
    data = ReportData.compute([deep_run], METRICS, reference="initial", source="train", channel=None, asked=ASKED)
    expected = sorted(set(top.index) | set(ASKED), key=int)  # model order
    assert data.ranked == list(top.index) and data.detail == expected
    assert set(data.percentiles[0]["layer"].astype(str)) == set(expected)  # no other layer's records were read
    assert set(data.last_drifts[0]["layer"].astype(str)) == set(expected)
    assert data.drifts[0]["layer"].nunique() == DEPTH  # the overview has every layer
    shown = build_sections(data, list(METRICS), reference="initial",
                           max_points=400, channel=None, source="train")
    drift = next(s for s in shown if s.name == "drift").figure
    labels = [ax.get_ylabel() for ax in drift.axes if ax.get_ylabel()]
    assert labels == [f"layer {layer}" for layer in expected]


def test_only_the_detail_layers_are_read_record_by_record(deep_run, monkeypatch):
    asked: list[list[str]] = []
    stats = deep_run.stats

    def spy(source=None, **filters):
        if filters.get("columns") is None:  # every column of the records read (drift reads only its columns)
            asked.append(list(filters.get("layers") or ["every layer"]))
        return stats(source, **filters)

    monkeypatch.setattr(deep_run, "stats", spy)
    data = ReportData.compute([deep_run], ["wasserstein"], reference="initial", source="train", channel=None, top=3)
    assert asked == [[layer] for layer in data.detail] and len(asked) == 3


def test_more_layers_than_fit_go_to_further_pages(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(sections, "ROWS_PER_PAGE", 2)
    monkeypatch.setattr(sections, "HEATMAP_ROWS_PER_PAGE", 2)
    page = report(list(runs), tmp_path, progress=False).read_text()
    paged = [f"{name}{suffix}.png" for name in ("heatmap", "percentiles", "drift", "channels") for suffix in ("", "-2")]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted([*paged, "curves.png"])
    assert png_size(tmp_path / "percentiles-2.png") == grid_pixels(1, 2)  # conv, bn | fc
    for title in ("Layer × step heatmap (2 of 2)", "Percentile trajectories (2 of 2)", "Drift over training (2 of 2)",
                  "Per-channel drift at the end of training (2 of 2)"):
        assert f"<h2>{title}</h2>" in page


def test_a_full_page_of_layers_stays_within_the_height_limit():
    names = [f"block.{i}.conv" for i in range(HEATMAP_ROWS_PER_PAGE)]
    frame = pd.DataFrame({"step": np.tile([0, 1], len(names)), "layer": np.repeat(names, 2),
                          "metric": "wasserstein", "value": 0.5})
    heatmap = overview.heatmap_figure([frame], ["run"], names, ["wasserstein"])
    assert heatmap.get_size_inches()[1] * DPI <= MAX_HEIGHT_PX
    assert (HEATMAP_ROWS_PER_PAGE + 1) * INCH_PER_ROW + 1.0 > MAX_HEIGHT_PX / DPI  # one more would not fit
    assert ROWS_PER_PAGE * PANEL_SIZE[1] * DPI <= MAX_HEIGHT_PX < (ROWS_PER_PAGE + 1) * PANEL_SIZE[1] * DPI


def test_a_log_schedule_puts_steps_on_a_symlog_axis(run_dirs):
    run = covshift.load(run_dirs[0])
    run.meta["config"]["schedule"] = {"kind": "log", "per_decade": 10}  # as runs on a log schedule will say
    data = ReportData.compute([run], ["wasserstein"], reference="initial", source="train", channel=None)
    assert sections.shared_step_axis(data).linthresh == 1.0  # linear from 0 to the first recorded step after it
    shown = build_sections(data, ["wasserstein"], reference="initial",
                           max_points=400, channel=None, source="train")
    scales = {s.name: {ax.get_xscale() for ax in s.figure.axes if ax.get_xlabel() == "training step"}
              for s in shown if s.name != "channels"}
    assert scales == {name: {"symlog"} for name in ("heatmap", "percentiles", "drift", "curves")}
    mesh = next(s for s in shown if s.name == "heatmap").figure.axes[0].collections[0]
    edges = np.unique(np.asarray(mesh.get_coordinates())[0, :, 0])
    between = edges[(edges > 10) & (edges < 11)]
    assert between == pytest.approx([np.sqrt(10 * 11)])  # columns meet half-way on the log axis, not at 10.5
    plain = ReportData.compute([covshift.load(run_dirs[0])], ["wasserstein"], reference="initial", source="train",
                               channel=None)
    assert sections.shared_step_axis(plain).linthresh is None  # 24 steps every 1: a linear axis


def test_a_big_report_shows_progress_on_stderr(runs, tmp_path, capsys, monkeypatch):
    report(runs[0], tmp_path / "quiet", metrics="wasserstein")  # 2 layers: no bar by default
    assert "covshift report" not in capsys.readouterr().err
    monkeypatch.setattr(sys.modules["covshift.reporting.build"], "PROGRESS_LAYERS", 2)
    report(runs[0], tmp_path / "shown", metrics="wasserstein")
    assert "covshift report" in capsys.readouterr().err
    report(runs[0], tmp_path / "off", metrics="wasserstein", progress=False)
    assert "covshift report" not in capsys.readouterr().err


def test_top_must_be_a_count(runs, tmp_path):
    with pytest.raises(ValueError, match="top must be an int of at least 0 .*got -1"):
        report(runs[0], tmp_path, top=-1)
