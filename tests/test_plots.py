"""Figure primitives and grids, drawn on object-oriented Figures from small hand-made frames."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import covshift
from covshift.reporting import figures
from covshift.reporting import heatmap as overview
from covshift.reporting import panels, plots
from covshift.reporting.data import layer_percentiles


def _axes():
    return Figure().add_subplot()


def _drift_frame(layers: dict[str, np.ndarray], metric: str = "wasserstein") -> pd.DataFrame:
    return pd.concat(
        [pd.DataFrame({"step": np.arange(len(v)), "layer": layer, "metric": metric, "value": v})
         for layer, v in layers.items()],
        ignore_index=True,
    )


def test_thin_steps_keeps_ends_and_bounds_the_count():
    steps = np.repeat(np.arange(0, 1000, 3), 2)  # repeated, as in per-layer rows
    rows_at_thinned_steps = plots.thinned_steps(steps, 50)
    assert len(rows_at_thinned_steps) <= 50
    assert rows_at_thinned_steps[0] == 0 and rows_at_thinned_steps[-1] == 999
    assert np.all(np.diff(rows_at_thinned_steps) > 0)
    assert plots.thinned_steps([5, 1, 3], 10).tolist() == [1, 3, 5]


def test_thin_steps_rejects_fewer_than_two_points():
    with pytest.raises(ValueError, match="max_points must be at least 2, got 1"):
        plots.thinned_steps(np.arange(5), 1)


def test_percentile_trajectory_draws_band_and_three_percentiles_on_the_given_axes():
    ax = _axes()
    frame = pd.DataFrame({"step": [2, 0, 1], "q0.01": [-3.0, -2.0, -2.5], "q0.15": [-1.0, -0.5, -0.7],
                          "q0.5": [0.2, 0.0, 0.1], "q0.85": [1.0, 0.5, 0.7], "q0.99": [3.0, 2.0, 2.5]})
    band, low, mid, high = plots.percentile_trajectory(frame, ax=ax, color="C3")
    assert all(artist.axes is ax for artist in (band, low, mid, high))
    np.testing.assert_array_equal(mid.get_xdata(), [0, 1, 2])
    np.testing.assert_array_equal(mid.get_ydata(), [0.0, 0.1, 0.2])
    np.testing.assert_array_equal(high.get_ydata(), [0.5, 0.7, 1.0])
    assert {low.get_linestyle(), mid.get_linestyle(), high.get_linestyle()} == {":", "-", "--"}
    lo, hi = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    assert (lo, hi) == (-3.0, 3.0)


def test_drift_line_draws_the_noise_floor_dashed_in_the_same_colour():
    ax = _axes()
    frame = pd.DataFrame({"step": [0, 1, 2], "value": [0.0, 0.3, 0.6]})
    noise = pd.DataFrame({"step": [0, 2], "value": [0.05, 0.05]})
    line, floor = plots.drift_line(frame, ax=ax, color="C1", label="bn", noise=noise)
    assert line.get_color() == floor.get_color() == "C1"
    assert line.get_linestyle() == "-" and floor.get_linestyle() == "--"
    assert floor.get_label() == "bn noise floor"
    assert len(plots.drift_line(frame, ax=ax, noise=noise.iloc[:0])) == 1


def test_drift_heatmap_rows_follow_the_layer_order_and_leave_missing_layers_blank():
    ax = _axes()
    frame = _drift_frame({"b": np.array([0.0, 1.0, 2.0]), "a": np.array([0.0, 0.5, 0.25])})
    mesh = plots.drift_heatmap(frame, ["a", "b", "c"], ax=ax)
    values = mesh.get_array().reshape(3, 3)
    np.testing.assert_array_equal(values[0], [0.0, 0.5, 0.25])
    np.testing.assert_array_equal(values[1], [0.0, 1.0, 2.0])
    assert values.mask[2].all() and not values.mask[:2].any()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]


def test_channel_boxes_draw_one_box_per_group_and_every_finite_channel_as_a_dot():
    ax = _axes()
    boxes = plots.channel_boxes([np.array([0.1, 0.2, np.nan]), np.arange(5.0)], [0, 1], ax=ax, color="C2")
    assert len(boxes["boxes"]) == 2
    assert boxes["points"][0].get_offsets().shape == (2 + 5, 2)


def test_training_curve_skips_missing_values_and_columns():
    ax = _axes()
    curves = pd.DataFrame({"step": [0, 1, 2], "test_acc": [0.5, np.nan, 0.9]})
    (line,) = plots.training_curve(curves, "test_acc", ax=ax)
    np.testing.assert_array_equal(line.get_xdata(), [0, 2])
    assert plots.training_curve(curves, "train_loss", ax=ax) == []


def test_spans_decades_ignores_zeros_and_non_finite_values():
    assert panels.spans_decades(np.array([0.0, 0.01, 2.0, np.inf]))
    assert not panels.spans_decades(np.array([0.0, 0.5, 2.0, np.nan]))
    assert not panels.spans_decades(np.array([]))


def test_drift_figure_scales_each_panel_on_its_own_with_one_label_per_row_and_thins_lines():
    steps = 50
    wide = _drift_frame({"a": np.geomspace(1e-4, 1.0, steps), "b": np.linspace(0, 1, steps)})
    narrow = _drift_frame({"a": np.linspace(1, 2, steps), "b": np.linspace(1, 300, steps)}, metric="ks")
    both = pd.concat([wide, narrow], ignore_index=True)
    other = both.assign(value=both["value"] * 0.5)
    fig = figures.drift_figure([both, other], [None, None], ["x", "y"], ["a", "b"], ["wasserstein", "ks"],
                               max_points=10)
    axes = np.array(fig.axes).reshape(2, 2)
    # log only where the panel's own values span decades; a shared axis no longer squashes layer a's ks
    assert [[ax.get_yscale() for ax in row] for row in axes] == [["log", "linear"], ["linear", "log"]]
    assert not axes[0, 1].get_shared_y_axes().joined(axes[0, 1], axes[1, 1])
    assert axes[0, 1].get_ylim()[1] < 3  # layer a's ks (up to 2) fills its panel
    assert [ax.get_ylabel() for ax in axes.ravel()] == ["layer a", "", "layer b", ""]
    assert [ax.get_title() for ax in axes.ravel()] == [covshift.metrics.get("wasserstein").axis_label(), "KS statistic", "", ""]
    lines = axes[0, 0].get_lines()
    assert len(lines) == 2 and all(len(line.get_xdata()) <= 10 for line in lines)
    assert [line.get_color() for line in lines] == ["C0", "C1"]
    assert not [t for ax in fig.axes for t in ax.texts]  # nothing coincides, nothing is short
    assert tuple(fig.get_size_inches()) == (2 * panels.PANEL_SIZE[0], 2 * panels.PANEL_SIZE[1])


def test_drift_figure_says_when_two_runs_coincide_and_keeps_both_visible():
    same = _drift_frame({"a": np.linspace(0, 1, 20), "b": np.linspace(0, 2, 20)})
    moved = same.assign(value=np.where(same["layer"] == "b", same["value"] * 0.3, same["value"]))
    fig = figures.drift_figure([same, moved], [None, None], ["plain", "bn"], ["a", "b"], ["wasserstein"])
    coinciding, apart = fig.axes
    assert [t.get_text() for t in coinciding.texts] == ["bn and plain coincide"]
    plain, bn, halo = coinciding.get_lines()
    assert halo.get_color() == plain.get_color() and halo.get_linewidth() > 2 * bn.get_linewidth()
    np.testing.assert_array_equal(halo.get_ydata(), plain.get_ydata())  # plain shows around bn, on top of it
    assert halo.get_label() == "_nolegend_" and plain.get_linewidth() == bn.get_linewidth()
    assert apart.texts == [] or [t.get_text() for t in apart.texts] == []


def test_drift_figure_says_why_a_run_with_one_step_has_no_line():
    one = _drift_frame({"a": np.array([0.0])})
    many = _drift_frame({"a": np.linspace(0, 1, 2)})
    fig = figures.drift_figure([one, many], [None, None], ["short", "long"], ["a"], ["wasserstein"])
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.texts] == ["short: 1 recorded step, no drift"]
    (line,) = ax.get_lines()
    assert line.get_color() == "C1" and line.get_marker() == "o"  # 2 points: marked


def test_heatmap_greys_out_the_reference_step_instead_of_colouring_it_as_no_drift():
    frame = _drift_frame({"a": np.array([0.0, 0.5, 1.0]), "b": np.array([0.0, 2.0, 3.0])})
    fig = overview.heatmap_figure([frame], ["run"], ["a", "b"], ["wasserstein"], reference="initial")
    mesh = fig.axes[0].collections[0]
    assert mesh.get_array().size == 2 * 2  # steps 1 and 2 are coloured; step 0, the reference, is not
    assert mesh.get_coordinates()[..., 0].min() == 0.5
    (hatch,) = fig.axes[0].patches  # the reference column, hatched, where step 0 would be
    assert hatch.get_hatch() == "///" and hatch.get_x() == -0.5 and hatch.get_width() == 1.0
    assert "hatched" in fig.get_suptitle()
    fig = overview.heatmap_figure([frame], ["run"], ["a", "b"], ["wasserstein"], reference="previous")
    assert not np.ma.getmaskarray(fig.axes[0].collections[0].get_array()).any()
    assert not fig.axes[0].patches


def test_curves_with_two_points_get_markers_and_the_shared_step_range():
    curves = pd.DataFrame({"step": [4, 9], "train_loss": [1.0, 0.5], "test_acc": [0.3, 0.6]})
    fig = figures.curves_figure([curves], ["run"], xlim=(0.0, 100.0))
    loss, acc = fig.axes
    assert [line.get_marker() for ax in (loss, acc) for line in ax.get_lines()] == ["o", "o"]
    drift = figures.drift_figure([_drift_frame({"a": np.linspace(0, 1, 5)})], [None], ["run"], ["a"],
                                 ["wasserstein"], xlim=(0.0, 100.0))
    assert loss.get_xlim() == acc.get_xlim() == drift.axes[0].get_xlim()
    assert loss.get_xlim()[0] < 0 and loss.get_xlim()[1] > 100


def test_heatmap_figure_shares_one_colour_scale_between_runs():
    small = _drift_frame({"a": np.array([0.0, 0.1]), "b": np.array([0.2, 0.3])})
    large = _drift_frame({"a": np.array([0.0, 4.0]), "b": np.array([1.0, 2.0])})
    fig = overview.heatmap_figure([small, large], ["small", "large"], ["a", "b"], ["wasserstein"])
    meshes = [ax.collections[0] for ax in fig.axes[:2]]
    assert len(meshes) == 2
    assert meshes[0].norm is meshes[1].norm
    assert (meshes[0].norm.vmin, meshes[0].norm.vmax) == (0.0, 4.0)


def test_layer_percentiles_average_channels_or_select_one():
    stats = pd.DataFrame({"step": [0, 0], "layer": ["a", "a"], "channel": [0, 1],
                          **{q: [1.0, 3.0] for q in ("q0.01", "q0.15", "q0.5", "q0.85", "q0.99")}})
    assert layer_percentiles(stats)["q0.5"].tolist() == [2.0]
    assert layer_percentiles(stats, channel=1)["q0.5"].tolist() == [3.0]


def test_report_and_cli_never_import_pyplot():
    code = "import sys, covshift.reporting.build, covshift.cli; sys.exit('matplotlib.pyplot' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_drift_panel_without_a_finite_value_says_so():
    constant = _drift_frame({"a": np.full(4, np.nan)})
    fig = figures.drift_figure([constant], [None], ["run"], ["a"], ["wasserstein"])
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.texts] == ["run: no finite drift (constant or non-finite input)"]



def test_long_layer_names_are_neither_clipped_nor_overlapping():
    """Hugging Face names like ``bert.encoder.layer.0.attention.output.LayerNorm``, 19 of them, fit."""
    names = [f"bert.encoder.layer.{i // 6}.attention.output.{kind}" for i, kind in
             enumerate(["dense", "LayerNorm", "query", "key", "value", "intermediate.dense"] * 3)]
    names.append("classifier")
    frame = _drift_frame({name: np.linspace(0, 1, 5) for name in names})
    heatmap = overview.heatmap_figure([frame], ["bert"], names, ["wasserstein"])
    drift = figures.drift_figure([frame], [None], ["bert"], names[:4], ["wasserstein"])
    for fig in (heatmap, drift):
        FigureCanvasAgg(fig).draw()
    renderer = heatmap.canvas.get_renderer()
    ticks = [t.get_window_extent(renderer) for t in heatmap.axes[0].get_yticklabels()]
    assert min(box.x0 for box in ticks) >= 0, "a layer name runs off the figure's left edge"
    assert all(lower.y1 <= upper.y0 + 1 for lower, upper in zip(ticks[1:], ticks))  # top to bottom, no overlap
    renderer = drift.canvas.get_renderer()
    for ax in drift.axes:
        label, panel = ax.yaxis.label.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert label.height <= panel.height and label.x0 >= 0, ax.yaxis.label.get_text()
