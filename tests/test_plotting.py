"""``covshift.plot``: one layer of a run on a given Axes, drawn from the run's own numbers."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

import covshift
from covshift.reporting.data import layer_percentiles

matplotlib.use("Agg")


def test_percentiles_draw_the_layer_mean_quantiles_on_the_given_axes(runs):
    run = runs[0]
    fig = Figure()
    ax = fig.add_subplot()
    band, low, mid, high = covshift.plot(run, layer="conv", kind="percentiles", ax=ax)
    assert all(artist.axes is ax for artist in (band, low, mid, high))
    stats = run.stats(source="train")
    expected = layer_percentiles(stats[stats["layer"] == "conv"])
    np.testing.assert_array_equal(mid.get_xdata(), expected["step"])
    np.testing.assert_allclose(mid.get_ydata(), expected["q0.5"])
    np.testing.assert_allclose(high.get_ydata(), expected["q0.85"])
    assert "conv" in ax.get_title()
    fig.savefig(io.BytesIO(), format="png")  # draws without error on the Agg backend


def test_one_channel_differs_from_the_mean(runs):
    mean = covshift.plot(runs[0], layer="fc", kind="percentiles")[2].get_ydata()
    one = covshift.plot(runs[0], layer="fc", kind="percentiles", channel=5)[2].get_ydata()
    stats = runs[0].stats(source="train")
    expected = stats[(stats["layer"] == "fc") & (stats["channel"] == 5)].sort_values("step")["q0.5"]
    np.testing.assert_allclose(one, expected)
    assert not np.allclose(mean, one)


def test_drift_draws_the_layer_drift_and_its_noise_floor(runs, run_dirs):
    ax = Figure().add_subplot()
    line, floor = covshift.plot(str(run_dirs[0]), layer="fc", kind="drift", ax=ax, metric="mean_shift")
    expected = covshift.drift(runs[0], metric="mean_shift")
    expected = expected[expected["layer"] == "fc"].sort_values("step")
    np.testing.assert_allclose(line.get_ydata(), expected["value"])
    noise = covshift.noise_floor(runs[0], metric="mean_shift")
    np.testing.assert_allclose(floor.get_ydata(), noise[noise["layer"] == "fc"].sort_values("step")["value"])
    assert floor.get_linestyle() == "--" and line.axes is ax is floor.axes
    assert ax.get_ylabel() == "drift"


def test_without_ax_a_new_figure_is_made(runs):
    (line, *_) = covshift.plot(runs[1], layer="bn", kind="drift")
    assert isinstance(line.figure, Figure)


def test_unknown_layer_lists_the_layers(runs):
    with pytest.raises(ValueError, match=r"layer 'nope' is not in run 'plain'; its layers are \['conv', 'fc'\]"):
        covshift.plot(runs[0], layer="nope")


def test_unknown_kind_lists_the_kinds(runs):
    with pytest.raises(ValueError, match=r"kind must be one of \('percentiles', 'drift'\), got 'heat'"):
        covshift.plot(runs[0], layer="fc", kind="heat")
