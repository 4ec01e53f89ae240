"""The public metric registry (``covshift.metrics.register``), used from outside the package.

A metric registered once appears in ``drift()``, ``metric="all"``, the report and its
glossary, ``to_tensorboard`` and, through the ``covshift.metrics`` entry point group,
the ``covshift`` command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import covshift
from covshift import metrics

ROOT = Path(__file__).resolve().parent.parent
LABEL = "spread gap"
DESCRIPTION = "how far the standard deviation of the channel moved from the reference"
BUILTIN = ("mean_shift", "std_ratio", "wasserstein", "gaussian_w2", "ks", "psi", "js")


def spread_gap_of(pair: metrics.Pair) -> np.ndarray:
    return np.abs(pair.sd - pair.ref_sd)


@pytest.fixture
def spread_gap():
    """``spread_gap = |σ − σ_ref|``, in the input's units (so divided by σ_ref when normalized)."""
    metric = metrics.register("spread_gap", spread_gap_of, label=LABEL, description=DESCRIPTION, scaled=True)
    try:
        yield metric
    finally:
        metrics.unregister("spread_gap")


def record_steps(model: torch.nn.Module, directory: Path | None = None) -> covshift.Run:
    """Four forwards (one step each) whose 3 input channels spread out at different speeds and shift."""
    gen = torch.Generator().manual_seed(0)
    with covshift.attach(model, every=1, store=directory, name="spread") as tracker:
        for step in range(4):
            x = torch.randn(256, 3, generator=gen) * (1 + 0.4 * step * torch.tensor([1.0, 2.0, 3.0])) + 0.1 * step
            model(x)
    return covshift.load(directory) if directory is not None else tracker.run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stored run of two linear layers ``0`` and ``1`` (no dead channels), 4 recorded steps."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("runs") / "spread"
    record_steps(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)), directory)
    return directory


@pytest.fixture(scope="module")
def run(run_dir: Path) -> covshift.Run:
    return covshift.load(run_dir)


def hand_spread_gap(run: covshift.Run, normalize: bool) -> pd.Series:
    """Per (step, layer, channel): |σ_t − σ_ref| (÷ σ_ref), σ = sqrt(var), σ_ref at the channel's first step."""
    stats = run.stats("train")[["step", "layer", "channel", "var"]].copy()
    stats["layer"] = stats["layer"].astype(str)
    stats["sd"] = np.sqrt(stats["var"].to_numpy(np.float64))
    first = stats.loc[stats.groupby(["layer", "channel"])["step"].idxmin(), ["layer", "channel", "sd"]]
    stats = stats.merge(first.rename(columns={"sd": "ref_sd"}), on=["layer", "channel"])
    gap = (stats["sd"] - stats["ref_sd"]).abs()
    stats["value"] = gap / stats["ref_sd"] if normalize else gap
    return stats.set_index(["step", "layer", "channel"])["value"].sort_index()


def by_key(frame: pd.DataFrame, keys: list[str]) -> pd.Series:
    frame = frame.assign(layer=frame["layer"].astype(str))
    return frame.set_index(keys)["value"].sort_index()


def test_drift_of_a_registered_metric_matches_a_hand_computation(run, spread_gap):
    expected = hand_spread_gap(run, normalize=True)
    layer_mean = expected.groupby(["step", "layer"]).mean()
    got = covshift.drift(run, metric="spread_gap")
    assert set(got["metric"]) == {"spread_gap"}
    assert list(by_key(got, ["step", "layer"]).index) == list(layer_mean.index)
    np.testing.assert_allclose(by_key(got, ["step", "layer"]), layer_mean, rtol=1e-5, atol=1e-7)
    assert layer_mean.loc[3].min() > 0.5  # the spread really moved: the check is not of zeros

    channels = covshift.drift(run, metric="spread_gap", normalize=False, by="channel")
    unscaled = hand_spread_gap(run, normalize=False)
    np.testing.assert_allclose(by_key(channels, ["step", "layer", "channel"]), unscaled, rtol=1e-5, atol=1e-6)


def test_a_registered_metric_is_listed_and_part_of_all(run, spread_gap):
    assert metrics.names()[: len(BUILTIN)] == BUILTIN and "spread_gap" in metrics.names()
    assert metrics.get("spread_gap") is spread_gap
    assert (spread_gap.label, spread_gap.description, spread_gap.scaled) == (LABEL, DESCRIPTION, True)
    every = covshift.drift(run, metric="all")
    assert set(every["metric"]) == {*BUILTIN, "spread_gap"}
    alone = covshift.drift(run, metric="spread_gap")
    np.testing.assert_array_equal(
        by_key(every[every["metric"] == "spread_gap"], ["step", "layer"]), by_key(alone, ["step", "layer"])
    )


def test_the_pair_holds_the_inputs_a_metric_reads(run):
    seen: list[dict[str, object]] = []

    def shapes(pair: metrics.Pair) -> np.ndarray:
        seen.append({name: None if getattr(pair, name) is None else np.shape(getattr(pair, name))
                     for name in ("mean", "sd", "ref_mean", "ref_sd", "binmeans", "ref_binmeans",
                                  "knots", "ref_knots", "levels")})
        return np.zeros(len(pair.mean))

    metrics.register("shapes_moments", shapes)
    metrics.register("shapes_sketch", shapes, reads=("binmeans", "knots"))
    try:
        covshift.drift(run, metric="shapes_moments")
        moments, seen[:] = list(seen), []
        covshift.drift(run, metric="shapes_sketch")
        sketch = list(seen)
    finally:
        metrics.unregister("shapes_moments")
        metrics.unregister("shapes_sketch")
    assert moments and sketch
    for shape in moments:
        n = shape["mean"][0]
        assert shape["sd"] == shape["ref_mean"] == shape["ref_sd"] == (n,)
        assert shape["binmeans"] is shape["ref_binmeans"] is shape["knots"] is shape["ref_knots"] is None
    for shape in sketch:
        n = shape["mean"][0]
        assert shape["binmeans"] == shape["ref_binmeans"] == (n, 32)
        k = shape["levels"][0]
        assert shape["knots"] == shape["ref_knots"] == (n, k) and k > 2
    assert sum(s["mean"][0] for s in sketch) == len(run.stats("train"))  # every record compared once


def test_builtin_and_taken_names_cannot_be_registered(run, spread_gap):
    for replace in (False, True):
        with pytest.raises(ValueError, match="'wasserstein' is already registered"):
            metrics.register("wasserstein", spread_gap_of, replace=replace)
    assert metrics.get("wasserstein").label == "W1"  # untouched
    with pytest.raises(ValueError, match="replace=True"):
        metrics.register("spread_gap", spread_gap_of)
    before = by_key(covshift.drift(run, metric="spread_gap"), ["step", "layer"])
    metrics.register("spread_gap", lambda pair: 2 * spread_gap_of(pair), label=LABEL, scaled=True, replace=True)
    after = by_key(covshift.drift(run, metric="spread_gap"), ["step", "layer"])
    np.testing.assert_allclose(after, 2 * before, rtol=1e-6)


@pytest.mark.parametrize("name", ["bad name", "", "1st"])
def test_a_name_must_be_an_identifier(name):
    with pytest.raises(ValueError, match="letters, digits and _"):
        metrics.register(name, spread_gap_of)
    assert name not in metrics.names()


def test_unregister(run):
    with pytest.raises(ValueError, match="cannot be removed"):
        metrics.unregister("ks")
    assert "ks" in metrics.names()
    with pytest.raises(ValueError, match="no registered metric is named 'never_registered'"):
        metrics.unregister("never_registered")
    metrics.register("short_lived", spread_gap_of)
    metrics.unregister("short_lived")
    assert "short_lived" not in metrics.names()
    with pytest.raises(ValueError, match="short_lived"):
        covshift.drift(run, metric="short_lived")


@pytest.mark.parametrize(
    "compute",
    [lambda pair: np.zeros((len(pair.mean), 2)), lambda pair: np.float64(0.0), lambda pair: pair.sd[:-1]],
    ids=["two-columns", "scalar", "one-short"],
)
def test_a_compute_of_the_wrong_shape_is_a_clear_error(run, compute):
    metrics.register("bad_shape", compute)
    try:
        with pytest.raises(ValueError, match=r"'bad_shape' returned shape .* one value per record"):
            covshift.drift(run, metric="bad_shape")
    finally:
        metrics.unregister("bad_shape")


def test_report_draws_a_registered_metric_with_its_glossary_line(run, spread_gap, tmp_path):
    page = covshift.report([run], tmp_path / "report", metrics=["spread_gap"])
    html = Path(page).read_text(encoding="utf-8")
    assert LABEL in html
    assert DESCRIPTION in html
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert set(summary["metric"]) == {"spread_gap"}


def test_report_with_all_metrics_includes_a_registered_one(run, spread_gap, tmp_path):
    page = covshift.report([run], tmp_path / "report", metrics="all")
    assert DESCRIPTION in Path(page).read_text(encoding="utf-8")
    assert "spread_gap" in set(pd.read_csv(tmp_path / "report" / "summary.csv")["metric"])


def test_to_tensorboard_exports_a_registered_metric(run, run_dir, spread_gap, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = covshift.to_tensorboard(run_dir, tmp_path / "tb", metric=["wasserstein", "spread_gap"], histograms=False)
    events = event_accumulator.EventAccumulator(str(out), size_guidance={event_accumulator.SCALARS: 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"covshift/spread_gap/0", "covshift/spread_gap/1", "covshift/spread_gap/layer_mean"} <= tags
    expected = covshift.drift(run, metric="spread_gap")
    for layer in ("0", "1"):
        rows = expected[expected["layer"].astype(str) == layer]
        written = events.Scalars(f"covshift/spread_gap/{layer}")
        assert [e.step for e in written] == rows["step"].tolist()
        np.testing.assert_allclose([e.value for e in written], rows["value"], rtol=1e-6)


# -- the command line, with the metric from a plugin's entry point --------------------------
PLUGIN = '''
"""A metric plugin, installed through a dist-info directory on PYTHONPATH."""
import numpy as np

from covshift import metrics


def register():
    metrics.register("plugin_gap", lambda pair: np.abs(pair.sd - pair.ref_sd), scaled=True,
                     label="plugin gap", description="the spread gap of the test plugin, loaded from an entry point")
'''


@pytest.fixture
def plugin_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a ``covshift`` command that finds the plugin's ``covshift.metrics`` entry point."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "covshift_test_plugin.py").write_text(textwrap.dedent(PLUGIN), encoding="utf-8")
    info = site / "covshift_test_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: covshift-test-plugin\nVersion: 1.0\n",
                                   encoding="utf-8")
    (info / "entry_points.txt").write_text("[covshift.metrics]\nplugin_gap = covshift_test_plugin:register\n",
                                           encoding="utf-8")
    paths = [str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1"}


def covshift_cmd(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "covshift", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300, check=False)


def test_cli_compare_uses_a_plugin_metric(run, run_dir, spread_gap, plugin_env):
    result = covshift_cmd(plugin_env, "compare", run_dir, run_dir, "--metric", "plugin_gap")
    assert result.returncode == 0, result.stderr
    assert "plugin gap" in result.stdout.splitlines()[0]  # the heading names the metric by its label
    # the plugin computes |σ − σ_ref| like spread_gap: the same numbers, printed as the command prints them
    table = covshift.drift_table(run, run, metric="spread_gap")
    for value in table["mean_a"]:
        assert f"{value:.4g}" in result.stdout
    assert table["mean_a"].max() > 0


def test_cli_report_uses_a_plugin_metric(run_dir, plugin_env, tmp_path):
    out = tmp_path / "report"
    result = covshift_cmd(plugin_env, "report", run_dir, "-o", out, "--metric", "plugin_gap", "wasserstein")
    assert result.returncode == 0, result.stderr
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "plugin gap" in html
    assert "the spread gap of the test plugin, loaded from an entry point" in html
    assert set(pd.read_csv(out / "summary.csv")["metric"]) == {"plugin_gap", "wasserstein"}


def test_cli_without_the_plugin_does_not_know_its_metric(run_dir, plugin_env):
    env = {**plugin_env, "PYTHONPATH": str(ROOT)}
    result = covshift_cmd(env, "compare", run_dir, run_dir, "--metric", "plugin_gap")
    assert result.returncode == 1
    assert "plugin_gap" in result.stderr


def test_cli_metrics_lists_the_builtins_and_a_plugin_metric(plugin_env):
    result = covshift_cmd(plugin_env, "metrics")
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines()]
    assert listed == [*covshift.metrics.names(), "plugin_gap"]
    assert "the spread gap of the test plugin, loaded from an entry point" in result.stdout


def test_a_plugin_that_fails_to_load_is_skipped_with_a_warning(plugin_env, tmp_path):
    site = Path(plugin_env["PYTHONPATH"].split(os.pathsep)[0])
    (site / "covshift_test_plugin.py").write_text("raise RuntimeError('broken plugin')\n", encoding="utf-8")
    result = covshift_cmd(plugin_env, "metrics")
    assert result.returncode == 0
    assert "plugin_gap" not in result.stdout and "broken plugin" in result.stderr
