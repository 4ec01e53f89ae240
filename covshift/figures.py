"""The report's figures: grids of :mod:`covshift.plots` panels, several runs side by side.

Every figure is a grid of panels of :data:`PANEL_SIZE` inches, saved at
:data:`DPI` dots per inch, so its pixel size follows from its grid alone:

==================  =============  ==============
figure              rows           columns
==================  =============  ==============
percentiles         layers         runs
drift               layers         metrics
heatmap             metrics        runs
channels            metrics        2 (fixed)
curves              1              2 (loss, accuracy)
==================  =============  ==============

Runs keep one colour (``C0``, ``C1``, … of matplotlib's cycle) in every figure,
and every figure's step axis covers the same range. Panels that compare runs
share their axes; each drift panel has its own y scale, logarithmic when its
positive values span more than two decades. Long runs are thinned to at most
``max_points`` steps for drawing only. The shared pieces live in :mod:`covshift.panels`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from covshift import plots
from covshift.panels import (  # noqa: F401 (DPI, PANEL_SIZE … are read as figures.*)
    DEFAULT_MAX_POINTS,
    DPI,
    INCH_PER_ROW,
    METRIC_LABELS,
    PANEL_SIZE,
    as_written,
    label_inches,
    legend,
    mark_few,
    metric_label,
    new_grid,
    not_recorded,
    reference_words,
    run_colors,
    spans_decades,
    steps_axis,
    thinned,
    title,
    wrapped_name,
)


def layer_percentiles(stats: pd.DataFrame, channel: int | None = None) -> pd.DataFrame:
    """Per (step, layer): the drawn quantiles of one channel, or their mean over the layer's channels.

    The mean over channels of each quantile is the quantile function of the
    channels' one-dimensional Wasserstein barycenter: a typical channel, not
    the pooled distribution (which mixes channels of different scales).

    Args:
        stats: :meth:`covshift.Run.stats` rows of one source.
        channel: a channel index, or None for the mean over channels.
    """
    columns = [*plots.PERCENTILE_BAND[:1], *plots.PERCENTILE_LINES, plots.PERCENTILE_BAND[1]]
    if channel is not None:
        stats = stats[stats["channel"] == channel]
    return stats.groupby(["step", "layer"], observed=True)[columns].mean().reset_index()


def percentiles_figure(
    percentiles: Sequence[pd.DataFrame],
    labels: Sequence[str],
    layers: Sequence[str],
    *,
    max_points: int = DEFAULT_MAX_POINTS,
    what: str = "mean over channels",
    xlim: tuple[float, float] | None = None,
) -> Figure:
    """Percentile trajectories: one row per layer, one column per run, y shared along a row."""
    fig, axes = new_grid(len(layers), len(labels), sharex=True, sharey="row")
    colors = run_colors(len(labels))
    for col, (frame, label, color) in enumerate(zip(percentiles, labels, colors)):
        frame = thinned(frame, max_points)
        for row, layer in enumerate(layers):
            ax = axes[row, col]
            part = frame[frame["layer"] == layer]
            if part.empty:
                not_recorded(ax)
            else:
                mark_few(plots.percentile_trajectory(part, ax=ax, color=color)[1:])
            steps_axis(ax, xlim)
            ax.set_title(wrapped_name(f"{label} · layer {layer}", 48), fontsize=10)
            if col == 0:
                ax.set_ylabel("input value")
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    legend(fig, _percentile_key(), len(labels))
    title(fig, f"Percentiles of each layer's input ({what})", len(labels))
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
    xlim: tuple[float, float] | None = None,
) -> Figure:
    """Drift over steps: one row per layer, one column per metric, runs overlaid, noise floors dashed.

    Each panel has its own y range (log when its values span decades), so no
    layer is squashed by another's scale. Runs whose lines coincide are said to;
    a run with fewer than 2 recorded steps has no drift, and its panels say so.
    """
    fig, axes = new_grid(len(layers), len(metrics), sharex=True, sharey=False)
    colors = run_colors(len(labels))
    for col, metric in enumerate(metrics):
        for row, layer in enumerate(layers):
            ax = axes[row, col]
            drawn: list[tuple[str, pd.DataFrame, Line2D]] = []
            notes = []
            for frame, noise, label, color in zip(drifts, noises, labels, colors):
                part = thinned(frame[(frame["metric"] == metric) & (frame["layer"] == layer)], max_points)
                if part.empty:
                    continue
                if part["step"].nunique() < 2:
                    notes.append(f"{as_written(label)}: 1 recorded step, no drift")
                    continue
                if not np.isfinite(part["value"].to_numpy(dtype=float)).any():
                    notes.append(f"{as_written(label)}: no finite drift (constant or non-finite input)")
                    continue
                floor = None
                if noise is not None:
                    floor = thinned(noise[(noise["metric"] == metric) & (noise["layer"] == layer)], max_points)
                line = plots.drift_line(part, ax=ax, color=color, label=as_written(label), noise=floor)[0]
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
                ax.set_title(metric_label(metric), fontsize=10)
            if col == 0:
                ax.set_ylabel(wrapped_name(f"layer {layer}"), fontsize=9)
            steps_axis(ax, xlim)
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    legend(fig, _first_legend(axes), len(metrics))
    title(fig, f"Drift of each layer's input from the {reference_words(reference)} (dashed: noise floor)",
           len(metrics))
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


def heatmap_figure(
    drifts: Sequence[pd.DataFrame],
    labels: Sequence[str],
    layers: Sequence[str],
    metrics: Sequence[str],
    *,
    reference: str | int = "initial",
    max_points: int = DEFAULT_MAX_POINTS,
    xlim: tuple[float, float] | None = None,
) -> Figure:
    """Layer × step heatmaps: one row per metric, one column per run, one colour scale per metric.

    The reference step (0 by definition) is hatched, not coloured as the lowest drift.
    """
    fig, axes = new_grid(len(metrics), len(labels), sharex=True, sharey=True, margin=label_inches(layers),
                         row_height=max(PANEL_SIZE[1], INCH_PER_ROW * len(layers) + 1.0))
    for row, metric in enumerate(metrics):
        parts = [_without_reference(thinned(frame[frame["metric"] == metric], max_points), reference)
                 for frame in drifts]
        norm = _shared_norm(np.concatenate([p["value"].to_numpy(dtype=float) for p in parts]))
        meshes = [
            plots.drift_heatmap(part, layers, ax=axes[row, col], norm=norm) for col, part in enumerate(parts)
        ]
        for col, (label, part) in enumerate(zip(labels, parts)):
            ax = axes[row, col]
            ax.set_title(as_written(label), fontsize=10)
            ax.set_yticks(np.arange(len(layers)), [as_written(layer) for layer in layers])
            _hatch_reference(ax, drifts[col], reference)
            if part["value"].notna().sum() == 0:
                not_recorded(ax, "fewer than 2 recorded steps: no drift")
            steps_axis(ax, xlim)
        axes[row, 0].set_ylabel("layer")
        fig.colorbar(meshes[0], ax=list(axes[row]), label=metric_label(metric), shrink=0.9)
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    hatched = " (hatched: the reference itself, 0 by definition)" if _reference_step(reference) else ""
    title(fig, f"Drift from the {reference_words(reference)}, layer × step{hatched}", len(labels))
    return fig


def _reference_step(reference: str | int) -> str | int | None:
    """``"first"`` for ``initial``, the step for an int reference, None when no step is a reference itself."""
    if reference == "initial":
        return "first"
    return reference if isinstance(reference, int) and not isinstance(reference, bool) else None


def _without_reference(frame: pd.DataFrame, reference: str | int) -> pd.DataFrame:
    """``frame`` with the reference step's values set to NaN (each layer's first step for ``initial``)."""
    which = _reference_step(reference)
    if which is None or frame.empty:
        return frame
    if which == "first":
        at_reference = frame["step"] == frame.groupby("layer", observed=True)["step"].transform("min")
    else:
        at_reference = frame["step"] == which
    return frame.assign(value=frame["value"].where(~at_reference))


def _hatch_reference(ax: Axes, frame: pd.DataFrame, reference: str | int) -> None:
    """Hatch the reference step's column (between the midpoints to its neighbour steps)."""
    which = _reference_step(reference)
    steps = np.unique(frame["step"].to_numpy()) if len(frame) else np.empty(0)
    if which is None or not len(steps):
        return
    at = steps[0] if which == "first" else which
    if at not in steps:
        return
    k = int(np.searchsorted(steps, at))
    half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
    left = (steps[k - 1] + at) / 2 if k > 0 else at - half
    right = (steps[k + 1] + at) / 2 if k + 1 < len(steps) else at + half
    ax.axvspan(left, right, facecolor="0.85", edgecolor="0.45", hatch="///", linewidth=0, zorder=3)


def channels_figure(
    channel_drifts: Sequence[pd.DataFrame],
    labels: Sequence[str],
    layers: Sequence[str],
    metrics: Sequence[str],
) -> Figure:
    """Per-channel drift at each run's last step: one box per (layer, run), one row per metric."""
    width, height = PANEL_SIZE
    fig = Figure(figsize=(2 * width, height * len(metrics)), dpi=DPI, layout="constrained")
    colors = run_colors(len(labels))
    box_width = 0.8 / max(len(labels), 1)
    for ax, metric in zip(fig.subplots(len(metrics), 1, squeeze=False)[:, 0], metrics):
        values, short = [], []
        for i, (frame, label, color) in enumerate(zip(channel_drifts, labels, colors)):
            part = frame[frame["metric"] == metric]
            if part["step"].nunique() < 2:
                short.append(f"{as_written(label)}: fewer than 2 recorded steps, no drift")
                continue
            last = part[part["step"] == part.groupby("layer", observed=True)["step"].transform("max")]
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
        ax.set_ylabel(metric_label(metric), fontsize=9)
        ax.set_title(f"{METRIC_LABELS.get(metric, metric)} per channel at the last step", fontsize=10)
        if short:
            not_recorded(ax, "\n".join(short))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left")
    title(fig, "Per-channel drift at the end of training (box: quartiles; dots: channels)", 2)
    return fig


def curves_figure(
    curves: Sequence[pd.DataFrame], labels: Sequence[str], *, xlim: tuple[float, float] | None = None
) -> Figure:
    """Training curves: loss (left) and accuracy (right), train solid and test dashed, one colour per run."""
    fig, axes = new_grid(1, 2, sharex=True, sharey=False)
    colors = run_colors(len(labels))
    for frame, label, color in zip(curves, labels, colors):
        for ax, kind in zip(axes[0], ("loss", "acc")):
            name = as_written(label)
            mark_few(plots.training_curve(frame, f"train_{kind}", ax=ax, color=color, label=f"{name} train"))
            mark_few(plots.training_curve(frame, f"test_{kind}", ax=ax, color=color, label=f"{name} test",
                                           linestyle="--"))
            steps_axis(ax, xlim)
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


def _shared_norm(values: np.ndarray) -> Normalize:
    finite = values[np.isfinite(values)]
    if spans_decades(finite):
        positive = finite[finite > 0]
        return LogNorm(vmin=np.percentile(positive, 1), vmax=positive.max(), clip=True)
    top = finite.max() if len(finite) else 1.0
    return Normalize(vmin=0.0, vmax=top if top > 0 else 1.0)


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

