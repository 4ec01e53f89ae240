"""`covshift.to_tensorboard`: a stored run's drift scalars and rebuilt input histograms, read back
with TensorBoard's own EventAccumulator."""

import numpy as np
import pytest
import torch

import covshift
from covshift.integrations.tensorboard import layer_histogram

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(logdir):
    accumulator = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0}
    )
    accumulator.Reload()
    return accumulator


@pytest.fixture
def stored_run(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with covshift.attach(model, optimizer=opt, every=2, store=tmp_path / "run") as tracker:
        for step in range(6):
            x = torch.randn(64, 4) + 0.3 * step  # inputs drift with the step
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    return tracker.run.directory


def test_export_has_drift_scalars_per_layer_and_metric(stored_run, tmp_path):
    out = covshift.to_tensorboard(stored_run, tmp_path / "tb", metric=["wasserstein", "mean_shift"])
    events = read_events(out)
    scalars = set(events.Tags()["scalars"])
    for metric in ("wasserstein", "mean_shift"):
        assert {f"covshift/{metric}/0", f"covshift/{metric}/2", f"covshift/{metric}/layer_mean"} <= scalars
    expected = covshift.drift(covshift.load(stored_run), "wasserstein")
    for layer in ("0", "2"):
        written = [(e.step, e.value) for e in events.Scalars(f"covshift/wasserstein/{layer}")]
        rows = expected[expected.layer == layer]
        assert [s for s, _ in written] == rows.step.tolist() == [0, 2, 4]
        np.testing.assert_allclose([v for _, v in written], rows.value, rtol=1e-6)
    mean = [e.value for e in events.Scalars("covshift/wasserstein/layer_mean")]
    np.testing.assert_allclose(mean, expected.groupby("step").value.mean(), rtol=1e-6)
    assert mean[-1] > mean[0] == 0.0


def test_export_rebuilds_input_histograms_from_quantiles(stored_run, tmp_path):
    run = covshift.load(stored_run)
    events = read_events(covshift.to_tensorboard(run, tmp_path / "tb"))
    assert {"covshift/input/0", "covshift/input/2"} <= set(events.Tags()["histograms"])
    histograms = events.Histograms("covshift/input/0")
    assert [h.step for h in histograms] == [0, 2, 4]
    stats = run.stats("train")
    for h in histograms:
        rows = stats[(stats.step == h.step) & (stats.layer == "0")]
        value = h.histogram_value
        assert value.num == rows["count"].sum() == 64 * 4
        assert sum(value.bucket) == pytest.approx(value.num)
        assert value.min == pytest.approx(rows["min"].min()) and value.max == pytest.approx(rows["max"].max())
        assert value.sum == pytest.approx((rows["count"] * rows["mean"]).sum())
        # the histogram's mean sits where the data are: inputs move by 0.3 per step
        centers = np.r_[value.min, value.bucket_limit[:-1]] / 2 + np.asarray(value.bucket_limit) / 2
        assert np.average(centers, weights=value.bucket) == pytest.approx(rows["mean"].mean(), abs=0.05)


@pytest.mark.filterwarnings("ignore:.*only 1 training step")
def test_rebuilt_histogram_matches_the_data():
    """Quantile knots from 4 channels of known distributions give back their pooled histogram."""
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 1)
    x = torch.cat([torch.randn(4000, 2), torch.rand(4000, 2) * 4 - 1], dim=1)
    with covshift.attach(model, every=1, sample_size=4000) as tracker:
        model(x)
    rows = tracker.run.stats("train")
    histogram = layer_histogram(rows, bins=16)
    edges = np.r_[histogram["min"], histogram["bucket_limits"]]
    truth, _ = np.histogram(x.numpy().ravel(), bins=edges)
    assert histogram["num"] == x.numel()
    # the quantile function is linear between 39 levels: each bucket within 1.5% of all values
    assert np.abs(np.array(histogram["bucket_counts"]) - truth).max() < 0.015 * x.numel()


def test_constant_and_empty_channels():
    frame = __import__("pandas").DataFrame(
        {"count": [5, 0], "mean": [2.0, np.nan], "var": [0.0, np.nan], "min": [2.0, np.nan], "max": [2.0, np.nan],
         "q0.5": [2.0, np.nan]}
    )
    histogram = layer_histogram(frame, bins=4)
    assert histogram["num"] == 5 and sum(histogram["bucket_counts"]) == pytest.approx(5)
    assert layer_histogram(frame.iloc[[1]]) is None


def test_export_needs_records_of_the_source(stored_run, tmp_path):
    with pytest.raises(ValueError, match="probe"):
        covshift.to_tensorboard(stored_run, tmp_path / "tb", source="probe")
