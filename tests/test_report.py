"""report(): PNG figures and a self-contained HTML page from real recorded runs."""

from __future__ import annotations

import base64
import re
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import covshift
from covshift.drift import METRICS as ALL_METRICS
from covshift.figures import DPI, PANEL_SIZE
from covshift.report import ReportData, build_sections, report, select_layers

METRICS = ("wasserstein", "mean_shift", "std_ratio")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def grid_pixels(rows: int, cols: int) -> tuple[int, int]:
    """The documented size of a figure of rows × cols panels."""
    return round(cols * PANEL_SIZE[0] * DPI), round(rows * PANEL_SIZE[1] * DPI)


def union_layers(*runs: covshift.Run) -> set[str]:
    return {str(n) for run in runs for n in run.layers["layer"]}


@pytest.fixture(scope="module")
def two_run_report(runs, tmp_path_factory) -> Path:
    return report(list(runs), tmp_path_factory.mktemp("report2"))


@pytest.fixture(scope="module")
def one_run_report(run_dirs, tmp_path_factory) -> Path:
    # a directory path works as well as a Run; max_points below the 24 steps thins the lines
    return report(run_dirs[1], tmp_path_factory.mktemp("report1"), max_points=5)


def test_two_run_report_writes_every_figure_at_its_grid_size(two_run_report, runs):
    out = two_run_report.parent
    layers = len(union_layers(*runs))
    expected = {
        "percentiles.png": grid_pixels(layers, 2),
        "drift.png": grid_pixels(layers, len(METRICS)),
        "heatmap.png": grid_pixels(len(METRICS), 2),
        "channels.png": grid_pixels(len(METRICS), 2),
        "curves.png": grid_pixels(1, 2),  # the plain run logged curves
    }
    for name, size in expected.items():
        assert (out / name).stat().st_size > 10_000, name
        assert png_size(out / name) == size, name
    assert sorted(p.name for p in out.glob("*.png")) == sorted(expected)


def test_one_run_report_without_curves_has_no_curves_figure(one_run_report, runs):
    out = one_run_report.parent
    layers = len(runs[1].layers)
    assert png_size(out / "percentiles.png") == grid_pixels(layers, 1)
    assert png_size(out / "heatmap.png") == grid_pixels(len(METRICS), 1)
    assert not (out / "curves.png").exists()
    assert "Training curves" not in one_run_report.read_text()


@pytest.mark.parametrize("which", ["one", "two"])
def test_html_embeds_every_figure_and_references_nothing_outside(which, one_run_report, two_run_report):
    page_path = one_run_report if which == "one" else two_run_report
    page = page_path.read_text()
    for png in page_path.parent.glob("*.png"):
        assert base64.b64encode(png.read_bytes()).decode() in page, png.name
    sources = re.findall(r"src=['\"]([^'\"]*)", page)
    assert len(sources) == len(list(page_path.parent.glob("*.png")))
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    for forbidden in ("http:", "https:", "//", "<script", "<link", "url(", "@import", "href="):
        assert forbidden not in text, forbidden


def test_summary_table_matches_drift_over_every_step(one_run_report, two_run_report, runs):
    plain, bn = runs
    full = covshift.drift(bn, metric=list(METRICS))
    expected = full.sort_values("step").groupby(["metric", "layer"], observed=True)["value"].agg(["mean", "last"])
    for page in (one_run_report, two_run_report):  # drawn with max_points=5 and with the default
        table = pd.read_csv(page.parent / "summary.csv", dtype={"layer": str}).set_index(["metric", "layer"])
        got = table.loc[[(m, str(layer)) for m, layer in expected.index]]
        np.testing.assert_allclose(got["bn mean"], expected["mean"], rtol=1e-6)
        np.testing.assert_allclose(got["bn final"], expected["last"], rtol=1e-6)


def test_summary_table_gives_each_runs_mean_noise_floor_in_metric_order(two_run_report, runs):
    table = pd.read_csv(two_run_report.parent / "summary.csv", dtype={"layer": str})
    assert list(dict.fromkeys(table["metric"])) == list(METRICS)
    floor = covshift.noise_floor(runs[1], metric=list(METRICS))
    expected = floor.groupby(["metric", floor["layer"].astype(str)])["value"].mean()
    got = table.set_index(["metric", "layer"])["bn noise"].loc[expected.index]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_summary_table_ratio_divides_each_run_by_the_first(two_run_report):
    table = pd.read_csv(two_run_report.parent / "summary.csv", dtype={"layer": str})
    shared = table.dropna(subset=["plain mean", "bn mean"])
    assert len(shared) > 0  # the input layer is recorded in both runs
    np.testing.assert_allclose(shared["bn/plain mean"], shared["bn mean"] / shared["plain mean"])
    only_one = table[table["plain mean"].isna()]
    assert only_one["bn/plain mean"].isna().all()
    assert "<table" in two_run_report.read_text() and "bn/plain final" in two_run_report.read_text()


def test_layers_of_several_runs_merge_in_model_order(runs):
    assert select_layers(runs) == ["conv", "bn", "fc"]
    assert select_layers(runs, ["f*", "conv"]) == ["conv", "fc"]


def test_report_selects_layers_by_pattern_and_rejects_unknown_ones(runs, tmp_path):
    layer = str(runs[0].layers["layer"].iloc[0])
    page = report(runs[0], tmp_path, metrics="wasserstein", layers=[layer])
    assert png_size(tmp_path / "percentiles.png") == grid_pixels(1, 1)
    assert png_size(tmp_path / "drift.png") == grid_pixels(1, 1)
    assert page.name == "report.html"
    with pytest.raises(ValueError, match="layers='nope' matches no recorded layer; recorded: conv, fc"):
        report(runs[0], tmp_path, layers="nope")


def test_report_rejects_bad_input(runs, tmp_path):
    with pytest.raises(ValueError, match="at least one run"):
        report([], tmp_path)
    with pytest.raises(ValueError, match="metrics must name at least one drift metric"):
        report(runs[0], tmp_path, metrics=[])
    with pytest.raises(covshift.store.RunFileError, match="does not exist"):
        report(tmp_path / "missing", tmp_path)


def test_all_metrics_and_a_rerun_into_the_same_directory(runs, tmp_path):
    report(runs[0], tmp_path, metrics="wasserstein", layers="conv")
    assert (tmp_path / "curves.png").exists()
    report(runs[1], tmp_path, metrics="all", layers="conv")  # this run logged no curves
    assert not (tmp_path / "curves.png").exists()
    table = pd.read_csv(tmp_path / "summary.csv")
    assert list(table["metric"]) == list(ALL_METRICS)
    assert png_size(tmp_path / "heatmap.png") == grid_pixels(7, 1)


@pytest.mark.parametrize("value", [1, 2.5, True])
def test_report_rejects_bad_max_points(runs, tmp_path, value):
    with pytest.raises(ValueError, match=f"max_points must be an int of at least 2, got {value!r}"):
        report(runs[0], tmp_path, max_points=value)


def test_report_rejects_a_negative_channel(runs, tmp_path):
    with pytest.raises(ValueError, match=r"channel must be None or a channel index \(an int >= 0\), got -1"):
        report(runs[0], tmp_path, channel=-1)


def test_report_rejects_a_channel_beyond_the_layers(runs, tmp_path):
    widest = int(runs[0].layers["channels"].max())
    with pytest.raises(ValueError, match=f"channel {widest} is out of range: the layers shown have at most {widest}"):
        report(runs[0], tmp_path, channel=widest)


def test_report_draws_one_channel_on_request(runs, tmp_path):
    page = report(runs[0], tmp_path / "c3", metrics="ks", layers="fc", channel=3)
    assert "channel 3" in page.read_text()
    assert png_size(tmp_path / "c3" / "percentiles.png") == grid_pixels(1, 1)
    report(runs[0], tmp_path / "c0", metrics="ks", layers="fc", channel=0)
    drawn = [(tmp_path / c / "percentiles.png").read_bytes() for c in ("c3", "c0")]
    assert drawn[0] != drawn[1]  # another channel's percentiles are drawn


def record_tiny(directory: Path, *, name: str, layer: str = "fc", steps: int = 4, every: int = 1) -> covshift.Run:
    """A run of a one-layer network named ``layer``, trained ``steps`` SGD steps, recorded every ``every``."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module(layer, nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with covshift.attach(model, every=every, store=directory, name=name):
        for _ in range(steps):
            loss = model(torch.randn(16, 4)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return covshift.load(directory)


def test_names_with_dollar_signs_are_drawn_as_written(tmp_path):
    from matplotlib.text import Text

    run = record_tiny(tmp_path / "run", name="budget $5 to $10", layer=r"price $\foo$")
    page = report(run, tmp_path / "out", metrics="wasserstein")  # raised "ValueError: Unknown symbol"
    assert r"price $\foo$" in page.read_text() and "budget $5 to $10" in page.read_text()
    data = ReportData.compute([run], ["wasserstein"], reference="initial", source="train",
                                  channel=None)
    sections = build_sections(data, ["budget $5 to $10"], [r"price $\foo$"], ["wasserstein"],
                                reference="initial", max_points=50, channel=None, source="train")
    for section in sections:
        fig = section.figure
        fig.canvas.draw()
        # what matplotlib draws for each text: (string shown, drawn as mathtext?)
        shown = [t._preprocess_math(t.get_text()) for t in fig.findobj(Text) if t.get_text()]
        names = [(s, math) for s, math in shown if "price" in s or "budget" in s]
        assert names, section.name
        for s, math in names:
            assert not math, (section.name, s)
            assert r"price $\foo$" in s or "budget $5 to $10" in s, (section.name, s)


def test_report_never_deletes_a_file_it_did_not_write(runs, tmp_path):
    (tmp_path / "curves.png").write_bytes(b"the user's own figure")
    (tmp_path / "heatmap-2.png").write_bytes(b"another")
    report(runs[1], tmp_path, metrics="wasserstein", layers="conv")  # this run logged no curves
    assert (tmp_path / "curves.png").read_bytes() == b"the user's own figure"
    assert (tmp_path / "heatmap-2.png").read_bytes() == b"another"


def test_a_rerun_removes_only_the_figures_the_previous_report_wrote(runs, tmp_path):
    report(runs[0], tmp_path, metrics="wasserstein", layers="conv")
    assert (tmp_path / "curves.png").exists()
    report(runs[1], tmp_path, metrics="wasserstein", layers="conv")  # no curves: the old figure goes
    assert not (tmp_path / "curves.png").exists()
    (tmp_path / "curves.png").write_bytes(b"the user's, written after")
    report(runs[1], tmp_path, metrics="wasserstein", layers="conv")
    assert (tmp_path / "curves.png").read_bytes() == b"the user's, written after"
