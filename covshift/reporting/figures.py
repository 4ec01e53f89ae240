"""The report's figures: grids of :mod:`covshift.reporting.plots` panels, several runs side by side.

Every figure is a grid of panels of :data:`PANEL_SIZE` inches, saved at
:data:`DPI` dots per inch, so its pixel size follows from its grid alone:

==================  =============  ==============
figure              rows           columns
==================  =============  ==============
percentiles         layers         runs
drift               layers         metrics
channels            metrics        2 (fixed)
curves              1              2 (loss, accuracy)
gradient ICS        2              runs
==================  =============  ==============

The report gives a figure at most :data:`covshift.panels.ROWS_PER_PAGE` layers,
so that no PNG is taller than :data:`covshift.defaults.MAX_HEIGHT_PX`; the
layer × step heatmap is in :mod:`covshift.reporting.overview`.

Runs keep one colour (``C0``, ``C1``, … of matplotlib's cycle) in every figure,
and every figure's step axis covers the same range, on the same (linear or
symlog, see :class:`~covshift.panels.StepAxis`) scale. Panels that compare runs
share their axes; each drift panel has its own y scale, logarithmic when its
positive values span more than two decades. Long runs are rows_at_thinned_steps to at most
``max_points`` steps for drawing only. The shared pieces live in :mod:`covshift.reporting.panels`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.cm import viridis
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from covshift.defaults import DEFAULT_MAX_POINTS
from covshift.metrics import get as get_metric
from covshift.reporting import plots
from covshift.reporting.text import reference_words
from covshift.reporting.panels import (
    DPI,
    PANEL_SIZE,
    StepAxis,
    as_written,
    legend,
    mark_few,
    panel_grid,
    not_recorded,
    run_colors,
    spans_decades,
    set_step_axis,
    rows_at_thinned_steps,
    title,
    wrapped_name,
)


def percentiles_figure(
    percentiles: Sequence[pd.DataFrame],
    labels: Sequence[str],
    layers: Sequence[str],
    *,
    max_points: int = DEFAULT_MAX_POINTS,
    what: str = "mean over channels",
    xlim: StepAxis | tuple[float, float] | None = None,
    quantity: str = "input",
) -> Figure:
    """Percentile trajectories: one row per layer, one column per run, y shared along a row.

    ``quantity`` names what the percentiles are of: each layer's ``"input"``, or its ``"input gradient"``.
    """
    fig, axes = panel_grid(len(layers), len(labels), sharex=True, sharey="row")
    colors = run_colors(len(labels))
    for col, (frame, label, color) in enumerate(zip(percentiles, labels, colors)):
        frame = rows_at_thinned_steps(frame, max_points, xlim)
        for row, layer in enumerate(layers):
            ax = axes[row, col]
            part = frame[frame["layer"] == layer]
            if part.empty:
                not_recorded(ax)
            else:
                mark_few(plots.percentile_trajectory(part, ax=ax, color=color)[1:])
            set_step_axis(ax, xlim)
            ax.set_title(wrapped_name(f"{label} · layer {layer}", 48), fontsize=10)
            if col == 0:
                ax.set_ylabel(f"{quantity} value")
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    legend(fig, _percentile_key(), len(labels))
    title(fig, f"Percentiles of each layer's {quantity} ({what})", len(labels))
    return fig


def drift_figure(
    drifts: Sequence[pd.DataFrame],
    noises: Sequence[pd.DataFrame | None],
    labels: Sequence[str],
    layers: Sequence[str],
    metrics: Sequence[str],
    *,
    reference: str = "initial",
    max_points: int = DEFAULT_MAX_POINTS,
    xlim: StepAxis | tuple[float, float] | None = None,
    nulls: Sequence[pd.DataFrame | None] | None = None,
) -> Figure:
    """Drift over steps: one row per layer, one column per metric, runs overlaid, noise floors dashed.

    Each panel has its own y range (log when its values span decades), so no
    layer is squashed by another's scale. Runs whose lines coincide are said to;
    a run with fewer than 2 recorded steps has no drift, and its panels say so.
    ``nulls`` (a :func:`covshift.noise.load_null_floor` frame per run, or None)
    adds each run's null 95th percentile, dotted.
    """
    fig, axes = panel_grid(len(layers), len(metrics), sharex=True, sharey=False)
    colors = run_colors(len(labels))
    nulls = list(nulls) if nulls is not None else [None] * len(labels)
    for col, metric in enumerate(metrics):
        for row, layer in enumerate(layers):
            ax = axes[row, col]
            set_step_axis(ax, xlim)
            drawn: list[tuple[str, pd.DataFrame, Line2D]] = []
            notes = []
            for frame, noise, null, label, color in zip(drifts, noises, nulls, labels, colors):
                part = rows_at_thinned_steps(frame[(frame["metric"] == metric) & (frame["layer"] == layer)], max_points, xlim)
                if part.empty:
                    continue
                if part["step"].nunique() < 2:
                    notes.append(f"{as_written(label)}: 1 recorded step, no drift")
                    continue
                if not np.isfinite(part["value"].to_numpy(dtype=float)).any():
                    notes.append(f"{as_written(label)}: no finite drift (constant or non-finite input)")
                    continue
                floor = null_floor = None
                if noise is not None:
                    floor = rows_at_thinned_steps(noise[(noise["metric"] == metric) & (noise["layer"] == layer)], max_points, xlim)
                if null is not None:
                    null_floor = null[(null["metric"] == metric) & (null["layer"].astype(str) == str(layer))]
                line = plots.drift_line(part, ax=ax, color=color, label=as_written(label), noise=floor,
                                        null=null_floor)[0]
                mark_few([line])
                notes += _coinciding(drawn, label, part)
                drawn.append((label, part, line))
            if not drawn and not notes:
                not_recorded(ax)
            if notes:
                ax.text(0.02, 0.97, "\n".join(notes), transform=ax.transAxes, ha="left", va="top", fontsize=8,
                        color="0.25", bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
            if drawn and spans_decades(np.concatenate([p["value"].to_numpy(dtype=float) for _, p, _ in drawn])):
                ax.set_yscale("log", nonpositive="mask")
            if row == 0:
                ax.set_title(get_metric(metric).axis_label(), fontsize=10)
            if col == 0:
                ax.set_ylabel(wrapped_name(f"layer {layer}"), fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    legend(fig, _first_legend(axes), len(metrics))
    floors = "dashed: noise floor" + ("; dotted: null 95th percentile" if any(n is not None for n in nulls) else "")
    title(fig, f"Drift of each layer's input from the {reference_words(reference)} ({floors})", len(metrics))
    return fig


def _coinciding(drawn: list[tuple[str, pd.DataFrame, Line2D]], label: str, part: pd.DataFrame) -> list[str]:
    """Notes for the runs already drawn whose line ``part`` lies on; their line gets a wide halo to stay visible."""
    notes = []
    for other, earlier, line in drawn:
        a, b = earlier["value"].to_numpy(dtype=float), part["value"].to_numpy(dtype=float)
        same_steps = np.array_equal(earlier["step"].to_numpy(), part["step"].to_numpy())
        scale = np.nanmax(np.abs(a)) if np.isfinite(a).any() else 0.0
        if same_steps and np.allclose(a, b, rtol=0.0, atol=max(1e-3 * scale, 1e-12), equal_nan=True):
            line.axes.plot(line.get_xdata(), line.get_ydata(), color=line.get_color(), linewidth=4.5, alpha=0.45,
                           zorder=line.get_zorder() - 0.1, label="_nolegend_")  # a halo: the run underneath
            notes.append(f"{as_written(label)} and {as_written(other)} coincide")
    return notes


def channels_figure(
    last_drifts: Sequence[pd.DataFrame],
    labels: Sequence[str],
    layers: Sequence[str],
    metrics: Sequence[str],
    steps: Sequence[int],
) -> Figure:
    """Per-channel drift at each run's last step: one box per (layer, run), one row per metric.

    Args:
        last_drifts: per run, :func:`covshift.drift` rows ``by="channel"`` of each layer's last recorded step.
        labels, layers, metrics: the runs' names, the layers (x axis) and the metrics (rows).
        steps: each run's number of recorded steps; a run with fewer than 2 has no drift, and says so.
    """
    width, height = PANEL_SIZE
    fig = Figure(figsize=(2 * width, height * len(metrics)), dpi=DPI, layout="constrained")
    colors = run_colors(len(labels))
    box_width = 0.8 / max(len(labels), 1)
    for ax, metric in zip(fig.subplots(len(metrics), 1, squeeze=False)[:, 0], metrics):
        values, short = [], []
        for i, (frame, label, color, n) in enumerate(zip(last_drifts, labels, colors, steps)):
            if n < 2:
                short.append(f"{as_written(label)}: fewer than 2 recorded steps, no drift")
                continue
            last = frame[frame["metric"] == metric]
            groups = {str(layer): group["value"].to_numpy() for layer, group in last.groupby("layer", observed=True)}
            present = [k for k, layer in enumerate(layers) if layer in groups]
            positions = [k + (i - (len(labels) - 1) / 2) * box_width for k in present]
            if present:
                boxes = plots.channel_boxes([groups[layers[k]] for k in present], positions, ax=ax, color=color,
                                            width=box_width * 0.9)
                boxes["boxes"][0].set_label(as_written(label))
            values.append(last["value"].to_numpy(dtype=float))
        if values and spans_decades(np.concatenate(values)):
            ax.set_yscale("log", nonpositive="mask")
        ax.set_xticks(range(len(layers)), [f"layer {as_written(layer)}" for layer in layers],
                      rotation=30 if len(layers) > 6 else 0, ha="right" if len(layers) > 6 else "center")
        ax.set_xlim(-0.6, len(layers) - 0.4)
        ax.set_ylabel(get_metric(metric).axis_label(), fontsize=9)
        ax.set_title(f"{get_metric(metric).label} per channel at the last step", fontsize=10)
        if short:
            not_recorded(ax, "\n".join(short))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left")
    title(fig, "Per-channel drift at the end of training (box: quartiles; dots: channels)", 2)
    return fig


#: Gradient ICS panels with more layers than this show no legend (colour runs from the first to the last layer).
ICS_LEGEND_LAYERS = 10


def gradient_ics_figure(
    frames: Sequence[pd.DataFrame | None],
    labels: Sequence[str],
    *,
    xlim: StepAxis | tuple[float, float] | None = None,
) -> Figure:
    """Gradient ICS per layer against steps: ‖G − G'‖ (top) and cos∠(G, G') (bottom), one column per run.

    ``frames`` are :func:`covshift.gradients.load_gradient_ics` frames (None: not recorded).
    Each panel is drawn by :func:`covshift.reporting.plots.plot_gradient_ics`; ‖G − G'‖ rows share a y axis.
    """
    fig, axes = panel_grid(2, len(labels), sharex=True, sharey="row")
    norms = np.concatenate([f["ics_norm"].to_numpy(dtype=float) for f in frames if f is not None] or [np.empty(0)])
    if spans_decades(norms):
        axes[0, 0].set_yscale("log", nonpositive="mask")  # the row shares its y axis
    for col, (frame, label) in enumerate(zip(frames, labels)):
        for row, value in enumerate(("ics_norm", "cosine")):
            ax = axes[row, col]
            set_step_axis(ax, xlim)
            if frame is None or frame.empty:
                not_recorded(ax, "no gradient ICS recorded")
                continue
            layers = frame["layer"].astype(str).unique()
            ax.set_prop_cycle(color=[viridis(k / max(len(layers) - 1, 1)) for k in range(len(layers))])
            plots.plot_gradient_ics(frame, value, ax=ax)
            ax.set_title(as_written(label), fontsize=10)
            ax.set_xlabel("training step" if row == 1 else "")
            if len(layers) > ICS_LEGEND_LAYERS:
                ax.get_legend().remove()
            else:
                ax.legend(title="layer", fontsize=7, title_fontsize=8)
    title(fig, "Gradient ICS (Santurkar et al. 2018): how much each layer's gradient moves when the layers "
               "before it take their step", len(labels))
    return fig


def curves_figure(
    curves: Sequence[pd.DataFrame], labels: Sequence[str], *, xlim: StepAxis | tuple[float, float] | None = None
) -> Figure:
    """Training curves: loss (left) and accuracy (right), train solid and test dashed, one colour per run."""
    fig, axes = panel_grid(1, 2, sharex=True, sharey=False)
    colors = run_colors(len(labels))
    for frame, label, color in zip(curves, labels, colors):
        for ax, kind in zip(axes[0], ("loss", "acc")):
            name = as_written(label)
            mark_few(plots.training_curve(frame, f"train_{kind}", ax=ax, color=color, label=f"{name} train"))
            mark_few(plots.training_curve(frame, f"test_{kind}", ax=ax, color=color, label=f"{name} test",
                                           linestyle="--"))
            set_step_axis(ax, xlim)
    loss_ax, acc_ax = axes[0]
    if spans_decades(np.concatenate([_column(f, c) for f in curves for c in ("train_loss", "test_loss")])):
        loss_ax.set_yscale("log")
    loss_ax.set(title="Loss", ylabel="cross-entropy loss", xlabel="training step")
    acc_ax.set(title="Accuracy", ylabel="accuracy (fraction correct)", xlabel="training step")
    for ax in axes[0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            not_recorded(ax, "not logged by these runs")
    title(fig, "Training curves (solid: train, dashed: test)", 2)
    return fig


def _column(frame: pd.DataFrame, column: str) -> np.ndarray:
    return frame[column].to_numpy(dtype=float) if column in frame else np.empty(0)


def _percentile_key() -> list[Artist]:
    """Legend entries for the percentile styles, in a neutral colour (runs have their own colours)."""
    band = Patch(color="0.4", alpha=0.15, label="1st–99th percentile")
    lines = [
        Line2D([], [], color="0.3", linestyle=style, label=f"{name} percentile")
        for name, style in plots.PERCENTILE_STYLES.values()
    ]
    return [band, *lines]


def _first_legend(axes: np.ndarray) -> list[Artist]:
    """One handle per label over every Axes, in drawing order."""
    seen: dict[str, Artist] = {}
    for ax in axes.ravel():
        for handle, name in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(name, handle)
    return list(seen.values())

