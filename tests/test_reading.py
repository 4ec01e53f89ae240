"""Filtered, out-of-core reads of a run; compact rows; runs written by older covshift."""

import importlib
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import covshift
from covshift.store import files as store
from covshift.store.records import sketch_rows
from covshift.schedule import Every, from_config
from covshift.summary.summarize import BINMEAN_COLUMNS, QUANTILE_COLUMNS



def _wide_run(directory, sketch_channels=4, steps=6, flush_every=100):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3), torch.nn.Linear(3, 2))
    tracker = covshift.attach(model, every=1, store=directory, sketch_channels=sketch_channels,
                              sample_size=64, flush_every=flush_every)
    for step in range(steps):
        model(torch.randn(32, 10) + step)
    return tracker.detach()


def test_filters_give_the_rows_of_the_whole_frame(tmp_path):
    run = _wide_run(tmp_path / "r", flush_every=2)
    whole = run.stats()
    some = run.stats(layers=["2", "0"], steps=[1, 4, 5])
    expected = whole[whole.layer.isin(["0", "2"]) & whole.step.isin([1, 4, 5])].reset_index(drop=True)
    pd.testing.assert_frame_equal(some, expected)
    ranged = run.stats(layers="3", steps=range(2, 5), columns=["mean", "q0.5"])
    assert list(ranged.columns) == ["step", "source", "layer", "channel", "mean", "q0.5"]
    expected = whole[(whole.layer == "3") & whole.step.between(2, 4)].reset_index(drop=True)
    pd.testing.assert_frame_equal(ranged, expected[list(ranged.columns)])
    assert list(ranged.layer.cat.categories) == ["0", "2", "3"]  # recording order, as the whole frame's


def test_rows_come_step_by_step_in_recording_order_of_layers(tmp_path):
    stats = _wide_run(tmp_path / "r", flush_every=2).stats()
    keys = list(zip(stats.step, stats.layer.cat.codes, stats.channel))
    assert keys == sorted(keys)


def test_bad_filters_name_what_is_valid(tmp_path):
    run = _wide_run(tmp_path / "r", steps=2)
    with pytest.raises(ValueError, match="no recorded layer 'fc'; recorded layers: 0, 2, 3"):
        run.stats(layers="fc")
    with pytest.raises(ValueError, match="no column 'median'; columns: step, source"):
        run.stats(columns=["median"])
    for steps in (["1"], 3.0):
        with pytest.raises(TypeError, match="steps must be an int or an iterable of ints"):
            run.stats(steps=steps)
    for layers in (0, ["0", 2]):
        with pytest.raises(TypeError, match="layers must be a layer name or a list of them"):
            run.stats(layers=layers)
    assert run.stats(steps=99).empty and run.stats(layers=[]).empty


def test_a_layer_read_skips_the_row_groups_of_other_layers(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "ROW_GROUP_ROWS", 12)  # one row group per layer and step here
    run = _wide_run(tmp_path / "r", steps=3)
    (part,) = store.part_paths(run.directory)
    metadata = pq.ParquetFile(part).metadata
    assert metadata.num_row_groups > 3
    read = []
    real = pq.ParquetFile.read_row_groups

    def counting(self, groups, *args, **kwargs):
        table = real(self, groups, *args, **kwargs)
        read.append(table.num_rows)
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", counting)
    assert len(run.stats(layers="3")) == 3 * 3
    assert metadata.num_rows == 75 and 9 <= sum(read) <= 9 + 12  # its rows, and one row group it shares


def test_wide_layers_keep_moments_for_every_channel_and_sketches_for_an_even_subset(tmp_path):
    compact = _wide_run(tmp_path / "compact", sketch_channels=4).stats()
    full = _wide_run(tmp_path / "full", sketch_channels=None).stats()
    moments = ["count", "mean", "var", "min", "max", "nonfinite", "zero_frac"]
    pd.testing.assert_frame_equal(compact[moments], full[moments])
    sketched = compact["q0.5"].notna()
    kept = compact[sketched]
    assert set(kept[kept.layer == "2"].channel) == {0, 4, 7, 11}  # 12 channels: 4 evenly spaced
    assert set(kept[kept.layer == "3"].channel) == {0, 1, 2}  # 3 channels: all of them
    assert set(kept[kept.layer == "0"].channel) == set(sketch_rows(10, 4).tolist()) == {0, 3, 6, 9}
    columns = list(QUANTILE_COLUMNS + BINMEAN_COLUMNS)
    np.testing.assert_array_equal(kept[columns].to_numpy(), full[sketched][columns].to_numpy())
    assert compact.loc[~sketched, columns].isna().all().all()


def test_a_compact_wide_run_is_smaller_on_disk(tmp_path):
    def size(run):
        return sum(p.stat().st_size for p in store.part_paths(run.directory))

    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    runs = {}
    for label, limit in (("compact", 16), ("full", None)):
        torch.manual_seed(0)
        tracker = covshift.attach(model, every=1, store=tmp_path / label, sketch_channels=limit)
        for _ in range(4):
            model(torch.randn(64, 256))
        runs[label] = tracker.detach()
    assert size(runs["compact"]) < size(runs["full"]) / 3


def _as_format_2(directory):
    """Rewrite a run as covshift wrote format 2: no schedule or sketch settings in its config, parts
    snappy-compressed in one row group, rows in the order steps were recorded."""
    (directory / "manifest.json").unlink()
    meta = json.loads((directory / "meta.json").read_text())
    meta["format_version"] = 2
    for key in ("schedule", "sketch_channels"):
        del meta["config"][key]
    (directory / "meta.json").write_text(json.dumps(meta))
    for part in store.part_paths(directory):
        table = pq.read_table(part)
        table = table.sort_by([("step", "ascending"), ("channel", "ascending")])  # not by layer first
        assert table.column("q0.5").null_count == 0  # format 2 kept every channel's sketch
        pq.write_table(table, part, compression="snappy", use_dictionary=["source", "layer"])


def test_a_format_2_run_loads_and_reports_drift(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    tracker = covshift.attach(model, every=2, store=tmp_path / "old", sample_size=64, sketch_channels=None)
    for step in range(5):
        model(torch.randn(16, 4) + step)
    original = tracker.detach().stats()
    _as_format_2(tmp_path / "old")
    written = sorted(p.stat().st_mtime_ns for p in (tmp_path / "old").iterdir())

    run = covshift.load(tmp_path / "old")
    assert run.meta["format_version"] == 2
    assert from_config(run.meta["config"]) == Every(2)  # from the config's "every": format 2 stored no schedule
    pd.testing.assert_frame_equal(run.stats(), original)
    assert len(run.stats(layers="2", steps=[2])) == 3  # Linear(3, 2): 3 input channels
    drift = covshift.drift(run, metric="mean_shift")
    assert set(drift.step) == {0, 2, 4} and drift.loc[drift.layer == "0", "value"].iloc[-1] > 0.5
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "old").iterdir()) == written  # reading wrote nothing


@pytest.mark.parametrize("by", ["layer", "channel"])
@pytest.mark.parametrize("reference", ["initial", "previous", "rolling:2", 2])
def test_drift_streamed_layer_by_layer_equals_drift_of_the_whole_frame(tmp_path, monkeypatch, by, reference):
    summaries_module = importlib.import_module("covshift.metrics.arrays")

    run = _wide_run(tmp_path / "r", flush_every=2)
    whole = covshift.drift(run.stats(), metric="all", reference=reference, by=by)
    monkeypatch.setattr(summaries_module, "BATCH_ROWS", 40)  # a layer or two per read
    read = []
    real = run.stats

    def counting(*args, **kwargs):
        read.append(kwargs.get("layers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "stats", counting)
    streamed = covshift.drift(run, metric="all", reference=reference, by=by)
    assert len(read) >= 3 and all(layers is not None for layers in read)
    pd.testing.assert_frame_equal(streamed, whole)


def test_quantile_metrics_aggregate_the_sketched_channels_and_moment_metrics_all(tmp_path):
    run = _wide_run(tmp_path / "r", sketch_channels=4)
    drift = covshift.drift(run, metric="all")
    last = drift[(drift.step == 5) & (drift.layer == "0")].set_index("metric")
    assert last.loc["mean_shift", "channels"] == 10 and last.loc["wasserstein", "channels"] == 4
    per_channel = covshift.drift(run, metric="wasserstein", by="channel")
    kept = per_channel[(per_channel.step == 5) & (per_channel.layer == "0")]
    assert kept.value.notna().sum() == 4
    assert last.loc["wasserstein", "value"] == pytest.approx(kept.value.mean())


def test_reading_a_run_and_its_drift_needs_no_torch(tmp_path):
    """The command line and notebooks open long runs without paying for torch's import (about 1.7 s here)."""
    import subprocess
    import sys

    _wide_run(tmp_path / "r", steps=3)
    code = (
        "import sys, covshift\n"
        f"run = covshift.load({str(tmp_path / 'r')!r})\n"
        "run.stats(layers='2'); run.sources(); covshift.drift(run, metric='all')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_source_without_records_is_named_without_reading_the_whole_run(tmp_path, monkeypatch):
    run = _wide_run(tmp_path / "r")

    def whole(*args, **kwargs):
        raise AssertionError("the whole run was read")

    monkeypatch.setattr(run, "_whole", whole)
    with pytest.raises(ValueError, match=r"no records of source='probe_a'; it has \['train'\]"):
        covshift.drift(run, source="probe_a")


@pytest.mark.parametrize("metric", ["wasserstein", "ks", "all"])
def test_a_frame_without_the_columns_a_metric_reads_says_which(tmp_path, metric):
    moments = _wide_run(tmp_path / "r").stats("train", columns=["count", "mean", "var", "min", "max"])
    with pytest.raises(ValueError, match=r"lacks the columns \['q0.01'"):
        covshift.drift(moments, metric=metric)
    assert not covshift.drift(moments, metric="mean_shift").empty  # the moments suffice for the moment metrics


class _LateBranch(torch.nn.Module):
    """``late`` is first called at the fourth forward."""

    def __init__(self):
        super().__init__()
        self.early, self.late, self.calls = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), 0

    def forward(self, x):
        self.calls += 1
        x = self.early(x)
        return self.late(x) if self.calls > 3 else x


def test_a_run_loaded_while_training_names_the_layers_recorded_after_it_was_loaded(tmp_path):
    model = _LateBranch()
    tracker = covshift.attach(model, every=1, store=tmp_path / "r", flush_every=1)
    for _ in range(2):
        model(torch.randn(8, 4))
    loaded = covshift.load(tmp_path / "r")  # before "late" was first called
    assert loaded.stats().layer.unique().tolist() == ["early"]
    for _ in range(4):
        model(torch.randn(8, 4))
    tracker.detach()
    stats = loaded.stats()
    assert not stats.layer.isna().any()
    assert stats.groupby("layer", observed=True).size().to_dict() == {"early": 6 * 4, "late": 3 * 3}
    assert list(stats.layer.cat.categories) == ["early", "late"]
    assert len(loaded.stats(layers="late")) == 3 * 3 and list(loaded.layers.layer) == ["early", "late"]
    pd.testing.assert_frame_equal(loaded.stats(), covshift.load(tmp_path / "r").stats())
