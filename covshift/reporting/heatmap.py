"""The report's overview figure: the layer × step heatmap of one metric, every layer.

A model of a hundred layers cannot get a row of panels per layer; the report
leads with what scales: one heatmap row per layer (:data:`INCH_PER_ROW` tall,
pages of at most :data:`covshift.reporting.panels.HEATMAP_ROWS_PER_PAGE` layers).
The layers are ranked in :mod:`covshift.reporting.data`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from covshift.defaults import DEFAULT_MAX_POINTS
from covshift.metrics import get as get_metric
from covshift.reporting import plots
from covshift.reporting.text import reference_words
from covshift.reporting.panels import (
    HEATMAP_EXTRA,
    INCH_PER_ROW,
    PANEL_SIZE,
    StepAxis,
    as_written,
    label_inches,
    panel_grid,
    not_recorded,
    spans_decades,
    set_step_axis,
    rows_at_thinned_steps,
    title,
)


def heatmap_figure(
    drifts: Sequence[pd.DataFrame],
    labels: Sequence[str],
    layers: Sequence[str],
    metrics: Sequence[str],
    *,
    reference: str | int = "initial",
    max_points: int = DEFAULT_MAX_POINTS,
    xlim: StepAxis | tuple[float, float] | None = None,
    emphasize: Collection[str] = (),
    part: str = "",
) -> Figure:
    """Layer × step heatmaps: one row per metric, one column per run, one colour scale per metric.

    The colour scale spans every layer in ``drifts``, not only ``layers``, so
    pages of one report (each a slice of the layers) share it. The reference
    step (0 by definition) is hatched, not coloured as the lowest drift. Names
    in ``emphasize`` are bold; ``part`` (e.g. "layers 1–229 of 500") ends the title.
    """
    fig, axes = panel_grid(len(metrics), len(labels), sharex=True, sharey=True, margin=label_inches(layers),
                         row_height=max(PANEL_SIZE[1], INCH_PER_ROW * len(layers) + HEATMAP_EXTRA))
    for row, metric in enumerate(metrics):
        parts = [_without_reference(rows_at_thinned_steps(frame[frame["metric"] == metric], max_points, xlim), reference)
                 for frame in drifts]
        norm = _shared_norm(np.concatenate([p["value"].to_numpy(dtype=float) for p in parts]))
        meshes = []
        for col, (label, part_frame) in enumerate(zip(labels, parts)):
            ax = axes[row, col]
            set_step_axis(ax, xlim)  # before drawing: columns are placed on the axis' scale
            meshes.append(plots.drift_heatmap(part_frame, layers, ax=ax, norm=norm))
            ax.set_title(as_written(label), fontsize=10)
            ax.set_yticks(np.arange(len(layers)), [as_written(layer) for layer in layers])
            for tick, layer in zip(ax.get_yticklabels(), layers):
                tick.set_fontweight("bold" if layer in emphasize else "normal")
            _hatch_reference(ax, drifts[col], reference)
            if part_frame["value"].notna().sum() == 0:
                not_recorded(ax, "fewer than 2 recorded steps: no drift")
        axes[row, 0].set_ylabel("layer")
        fig.colorbar(meshes[0], ax=list(axes[row]), label=get_metric(metric).axis_label(), shrink=0.9)
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    hatched = " (hatched: the reference itself, 0 by definition)" if _reference_step(reference) else ""
    title(fig, f"Drift from the {reference_words(reference)}, layer × step{hatched}" + (f", {part}" if part else ""),
          len(labels))
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
    """Hatch the reference step's column (between the midpoints to its neighbour steps on the axis' scale)."""
    which = _reference_step(reference)
    steps = np.unique(frame["step"].to_numpy()) if len(frame) else np.empty(0)
    if which is None or not len(steps):
        return
    at = steps[0] if which == "first" else which
    if at not in steps:
        return
    k = int(np.searchsorted(steps, at))
    edges = plots.cell_edges(steps.astype(float), ax)
    ax.axvspan(edges[k], edges[k + 1], facecolor="0.85", edgecolor="0.45", hatch="///", linewidth=0, zorder=3)


def _shared_norm(values: np.ndarray) -> Normalize:
    finite = values[np.isfinite(values)]
    if spans_decades(finite):
        positive = finite[finite > 0]
        return LogNorm(vmin=np.percentile(positive, 1), vmax=positive.max(), clip=True)
    top = finite.max() if len(finite) else 1.0
    return Normalize(vmin=0.0, vmax=top if top > 0 else 1.0)
