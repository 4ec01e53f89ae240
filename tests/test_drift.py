"""covshift.drift: accuracy through the real hook path, references, aggregation, noise floor, tables."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import ks_2samp, wasserstein_distance

import covshift
from covshift.metrics import names as metric_names
from covshift.metrics.api import drift, drift_table, drift_to_noise, noise_floor

METRICS = metric_names()

N_VALUES = 60000
KINDS = ("normal", "uniform", "relu", "student_t3", "bimodal")


def draw(rng: np.random.Generator) -> np.ndarray:
    """(N_VALUES, 5): one column per kind of distribution."""
    n = N_VALUES
    bimodal = np.where(rng.random(n) < 0.5, rng.normal(-2, 0.5, n), rng.normal(2, 0.5, n))
    columns = [rng.standard_normal(n), rng.uniform(-1, 1, n), np.maximum(rng.standard_normal(n), 0),
               rng.standard_t(3, n), bimodal]
    return np.stack(columns, axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def two_steps() -> tuple[np.ndarray, np.ndarray]:
    """Step 0 and step 1 data: fresh draws, step 1 scaled by 1.2 and shifted by 0.25."""
    rng = np.random.default_rng(0)
    return draw(rng), (1.2 * draw(rng) + 0.25).astype(np.float32)


def record(steps: list[np.ndarray], sample_size: int) -> covshift.Run:
    """Each array is one training forward of an nn.Linear: its input is recorded per column."""
    model = torch.nn.Linear(steps[0].shape[1], 2)
    with covshift.attach(model, every=1, sample_size=sample_size) as tracker:
        for x in steps:
            model(torch.from_numpy(x))
    return tracker.run


def step_one(run: covshift.Run, metric: str | list[str], **kwargs) -> pd.DataFrame:
    frame = drift(run, metric, reference="initial", by="channel", **kwargs)
    return frame[frame["step"] == 1].set_index(["metric", "channel"])["value"]


def test_w1_from_exact_summaries_matches_scipy(two_steps):
    x0, x1 = two_steps
    got = step_one(record([x0, x1], sample_size=N_VALUES), "wasserstein", normalize=False)
    for c, kind in enumerate(KINDS):
        expected = wasserstein_distance(x1[:, c], x0[:, c])
        assert got["wasserstein", c] == pytest.approx(expected, rel=0.02), kind  # W1 ≈ 0.2-0.6 σ: not tiny


def test_ks_from_exact_summaries_matches_scipy(two_steps):
    x0, x1 = two_steps
    got = step_one(record([x0, x1], sample_size=N_VALUES), "ks")
    for c, kind in enumerate(KINDS):
        assert got["ks", c] == pytest.approx(ks_2samp(x1[:, c], x0[:, c]).statistic, abs=0.005), kind


def test_w1_from_default_sample_size_is_within_its_sampling_error(two_steps):
    """With 1024 of 60000 values per channel the quantiles are sampled: the error is W1-noise sized.

    Two independent 1024-value samples of one distribution are ~0.03-0.06 σ apart in W1
    (docs/metrics.md); the error here stays within a few times that.
    """
    x0, x1 = two_steps
    exact = step_one(record([x0, x1], sample_size=N_VALUES), "wasserstein")
    sampled = step_one(record([x0, x1], sample_size=1024), "wasserstein")
    errors = (sampled - exact).abs()
    assert errors.max() < 0.15
    assert errors.max() > 0  # the sample really is a sample


def test_every_metric_is_zero_at_the_reference_step_and_grows_with_shift():
    rng = np.random.default_rng(1)
    base = draw(rng)
    run = record([base, base + 0.1, base + 1.0], sample_size=1024)
    layer = drift(run, "all").pivot_table(index="step", columns="metric", values="value")
    assert (layer.loc[0] == 0).all()
    moved = layer.drop(columns="std_ratio")  # a pure shift leaves the spread alone
    assert (moved.loc[2] > moved.loc[1]).all() and (moved.loc[1] > 0).all()
    assert layer.loc[2, "std_ratio"] == pytest.approx(0, abs=1e-6)


def test_normalized_location_metrics_are_in_units_of_the_reference_sd():
    rng = np.random.default_rng(2)
    base = (rng.standard_normal((4000, 1)) * np.float32([1, 10, 100])).astype(np.float32)
    run = record([base, base + np.float32([0.5, 5, 50])], sample_size=4000)
    frame = drift(run, ["mean_shift", "wasserstein", "gaussian_w2"], by="channel")
    values = frame[frame["step"] == 1].pivot_table(index="channel", columns="metric", values="value")
    for metric in values:
        np.testing.assert_allclose(values[metric], values[metric].iloc[0], rtol=1e-3)
    assert values["mean_shift"].iloc[0] == pytest.approx(0.5 / base[:, 0].std(), rel=1e-3)


@pytest.fixture(scope="module")
def drifting_run() -> covshift.Run:
    """8 steps of a 3-channel input whose mean grows: step s has mean 0.3 s."""
    rng = np.random.default_rng(3)
    return record([(rng.standard_normal((500, 3)) + 0.3 * s).astype(np.float32) for s in range(8)], 500)


def test_references(drifting_run):
    stats = drifting_run.stats("train").groupby("step")["mean"].mean()
    shift = lambda ref: drift(drifting_run, "mean_shift", reference=ref, normalize=False, by="channel")

    initial = shift("initial").groupby("step")["value"].mean()
    assert initial.index.tolist() == list(range(8)) and initial[0] == 0
    np.testing.assert_allclose(initial[5], 1.5, atol=0.2)

    previous = shift("previous")
    assert previous["step"].min() == 1 and set(previous["reference"]) == {"previous"}
    pd.testing.assert_frame_equal(
        previous.drop(columns="reference"), shift("rolling:1").drop(columns="reference")
    )

    at_step = shift(3).groupby("step")["value"].mean()
    assert at_step[3] == 0 and at_step[0] == pytest.approx(abs(stats[0] - stats[3]), rel=0.05)

    rolling = shift("rolling:3")
    assert rolling["step"].min() == 3 and set(rolling["reference"]) == {"rolling:3"}
    row = rolling[(rolling["step"] == 5) & (rolling["channel"] == 0)]["value"].item()
    means = drifting_run.stats("train").query("channel == 0").set_index("step")["mean"]
    assert row == pytest.approx(abs(means[5] - means[[2, 3, 4]].mean()))


def test_a_reference_that_leaves_no_step_gives_an_empty_frame():
    run = record([np.random.default_rng(5).standard_normal((64, 2)).astype(np.float32)], 64)
    frame = drift(run, "all", reference="previous")
    assert frame.empty and list(frame.columns) == [
        "step", "layer", "metric", "reference", "value", "channels", "excluded"
    ]


def test_layer_aggregates_match_pandas_over_channels(drifting_run):
    channels = drift(drifting_run, "wasserstein", by="channel")
    for agg in ("mean", "median", "max"):
        layer = drift(drifting_run, "wasserstein", agg=agg).set_index("step")["value"]
        expected = channels.groupby("step")["value"].agg(agg)
        np.testing.assert_allclose(layer, expected, rtol=1e-12)


def test_output_is_tidy(drifting_run):
    frame = drift(drifting_run, ["ks", "psi"])
    assert list(frame.columns) == ["step", "layer", "metric", "reference", "value", "channels", "excluded"]
    assert set(frame["metric"]) == {"ks", "psi"} and len(frame) == 16
    assert list(frame["layer"].cat.categories) == list(drifting_run.layers["layer"])
    channel = drift(drifting_run, "all", by="channel")
    assert list(channel.columns) == ["step", "layer", "channel", "metric", "reference", "value"]
    assert set(channel["metric"]) == set(METRICS) and len(channel) == 8 * 3 * len(METRICS)


def test_a_stats_dataframe_works_like_the_run(drifting_run):
    from_run = drift(drifting_run, "all")
    from_frame = drift(drifting_run.stats(), "all")
    pd.testing.assert_frame_equal(from_run, from_frame)
    shuffled = drifting_run.stats().sample(frac=1.0, random_state=0)  # any row order
    pd.testing.assert_frame_equal(from_run, drift(shuffled, "all"))
    pd.testing.assert_frame_equal(
        drift(drifting_run, "all", reference="rolling:2"), drift(shuffled, "all", reference="rolling:2")
    )


@pytest.mark.parametrize("reference", ["initial", "previous", "rolling:3"])
def test_chunks_on_worker_threads_give_the_same_values_as_one_pass(drifting_run, monkeypatch, reference):
    """Chunks of 5 records spread over threads; every value equals the single-chunk result."""
    engine = importlib.import_module("covshift.metrics.engine")
    whole = drift(drifting_run, "all", reference=reference, by="channel")
    monkeypatch.setattr(engine, "CHUNK_ROWS", 5)
    assert len(whole) // len(covshift.metrics.names()) > 2 * engine.CHUNK_ROWS  # several chunks of records
    chunked = drift(drifting_run, "all", reference=reference, by="channel")
    pd.testing.assert_frame_equal(whole, chunked)


def test_an_error_in_a_worker_thread_reaches_the_caller(drifting_run, monkeypatch):
    engine = importlib.import_module("covshift.metrics.engine")

    def broken(pair):
        raise RuntimeError("broken metric")

    monkeypatch.setattr(engine, "CHUNK_ROWS", 5)  # many chunks, computed on the worker threads
    covshift.metrics.register("broken_metric", broken)
    try:
        with pytest.raises(RuntimeError, match="broken metric"):
            drift(drifting_run, "broken_metric")
    finally:
        covshift.metrics.unregister("broken_metric")


def test_zero_variance_channels_are_excluded_and_counted_without_warnings():
    rng = np.random.default_rng(4)
    steps = []
    for s in range(3):
        x = rng.standard_normal((256, 4)).astype(np.float32)
        x[:, 1] = 0.0  # dead ReLU: all zeros
        x[:, 2] = 3.5  # a constant input
        if s == 2:
            x[:, 3] = 0.0  # a channel that dies at step 2
        steps.append(x)
    run = record(steps, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        channel = drift(run, "all", by="channel")
        layer = drift(run, "all", agg="median")
    dead = channel[channel["channel"].isin([1, 2])]
    assert dead["value"].isna().all()
    assert channel[(channel["channel"] == 3) & (channel["step"] == 2)]["value"].isna().all()
    assert channel[channel["channel"] == 0]["value"].notna().all()
    counts = layer.groupby("step")[["channels", "excluded"]].first()
    assert counts.loc[0].tolist() == [2, 2] and counts.loc[2].tolist() == [1, 3]
    assert layer["value"].notna().all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metric": "kl"}, r"metric must be 'all' or names from \('mean_shift'"),
        ({"metric": ["ks", "nope"]}, r"metric must be .*'nope'"),
        ({"reference": "first"}, r"reference must be 'initial', 'previous', an int step or 'rolling:K', got 'first'"),
        ({"reference": "rolling:0"}, r"got 'rolling:0'"),
        ({"reference": 999}, r"reference step 999 was not recorded; recorded steps run 0\.\.7"),
        ({"by": "step"}, r"by must be one of \('layer', 'channel'\), got 'step'"),
        ({"agg": "sum"}, r"agg must be one of \('mean', 'median', 'max'\), got 'sum'"),
        ({"source": "test"}, r"source must be one of \('train', 'probe', 'probe_a', 'probe_b', 'grad'\), got 'test'"),
        ({"source": "probe"}, r"the run has no records of source='probe'; it has \['train'\]"),
        ({"metric": None}, r"metric must be 'all' or names from .*, got None"),
    ],
)
def test_bad_arguments_name_the_valid_values(drifting_run, kwargs, message):
    with pytest.raises(ValueError, match=message):
        drift(drifting_run, **kwargs)


def test_bad_stats_frames_are_named(drifting_run):
    stats = drifting_run.stats()
    with pytest.raises(ValueError, match="without a 'source' column holds training records only; got source='probe'"):
        drift(stats.drop(columns="source"), source="probe")
    np.testing.assert_array_equal(drift(stats.drop(columns="source"))["value"], drift(stats)["value"])
    with pytest.raises(ValueError, match=r"lacks the columns \['var'\]"):
        drift(stats.drop(columns="var"))
    with pytest.raises(ValueError, match=r"24 records repeat a \(step, layer, channel\) of source='train', e.g. step 0"):
        drift(pd.concat([stats, stats]))
    with pytest.raises(TypeError, match="drift_table needs covshift.Run objects .* got run_a=DataFrame"):
        drift_table(stats, drifting_run)


def test_noise_floor_compares_the_two_probe_halves(runs):
    plain, _ = runs
    floor = noise_floor(plain, "mean_shift", normalize=False, by="channel")
    halves = [plain.stats(s).set_index(["step", "layer", "channel"])["mean"] for s in ("probe_a", "probe_b")]
    expected = (halves[0] - halves[1]).abs()
    got = floor.set_index(["step", "layer", "channel"])["value"]
    pd.testing.assert_series_equal(got.sort_index(), expected.sort_index(), check_names=False,
                                   check_index_type=False)
    assert set(floor["reference"]) == {"probe halves"}
    # The first layer sees the fixed probe batch itself: its floor cannot change over training.
    first = noise_floor(plain, "wasserstein").query("layer == 'conv'")["value"]
    assert first.nunique() == 1 and first.iloc[0] > 0


def test_noise_floor_needs_a_probe(drifting_run):
    with pytest.raises(ValueError, match=r"no records of source='probe_a'.*tracker\.probe"):
        noise_floor(drifting_run)


def test_drift_to_noise_divides_by_the_nearest_probe_floor(runs):
    plain, _ = runs
    joined = drift_to_noise(plain, "wasserstein")
    np.testing.assert_allclose(joined["ratio"], joined["value"] / joined["noise"])
    floor = noise_floor(plain, "wasserstein").set_index(["step", "layer"])["value"]
    row = joined[joined["step"] == 8].set_index("layer")
    assert row.loc["fc", "noise"] == floor[8, "fc"]
    probe_steps = np.array(sorted({step for step, _ in floor.index}))
    for step in joined["step"].unique():  # not a probe step: the nearest one's floor, before or after
        nearest = probe_steps[np.abs(probe_steps - step).argmin()]
        assert joined[(joined["step"] == step) & (joined["layer"] == "fc")]["noise"].item() == floor[nearest, "fc"]


def test_drift_table_by_name_leaves_out_layers_of_one_run(runs):
    plain, bn = runs
    table = drift_table(plain, bn)
    assert table["layer_a"].tolist() == ["conv", "fc"] and table["layer_b"].tolist() == ["conv", "fc"]
    per_layer = drift(bn, "wasserstein").sort_values("step")
    fc = per_layer[per_layer["layer"] == "fc"]["value"]
    row = table.set_index("layer_a").loc["fc"]
    assert row["mean_b"] == pytest.approx(fc.mean()) and row["final_b"] == pytest.approx(fc.iloc[-1])
    assert row["mean_ratio"] == pytest.approx(row["mean_b"] / row["mean_a"])
    noise_b = noise_floor(bn, "wasserstein")
    assert row["noise_b"] == pytest.approx(noise_b[noise_b["layer"] == "fc"]["value"].mean())


def test_drift_table_by_type_pairs_the_kth_layer_of_each_type(runs):
    plain, bn = runs
    table = drift_table(plain, bn, match="type")
    assert list(zip(table["layer_a"], table["layer_b"], table["type"])) == [
        ("conv", "conv", "Conv2d"), ("fc", "fc", "Linear")
    ]
    same = drift_table(plain, plain, metric="ks")
    np.testing.assert_allclose(same[["mean_ratio", "final_ratio"]].to_numpy(), 1.0)


def test_drift_table_errors(runs, drifting_run):
    plain, _ = runs
    with pytest.raises(ValueError, match=r"no layer of .* matches .* by name; try match='type'"):
        drift_table(plain, drifting_run)
    with pytest.raises(ValueError, match=r"match must be one of \('name', 'type'\), got 'order'"):
        drift_table(plain, plain, match="order")
    with pytest.raises(ValueError, match=r"drift_table takes one metric name"):
        drift_table(plain, plain, metric="all")

