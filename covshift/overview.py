"""The report's overview: every layer ranked by drift, and the layer × step heatmap of one metric.

A model of a hundred layers cannot get a row of panels per layer; the report
leads with what scales: one heatmap row per layer (:data:`INCH_PER_ROW` tall,
pages of at most :data:`covshift.panels.HEATMAP_ROWS_PER_PAGE` layers) and the layers ranked by
drift (:func:`rank_layers`), whose top few get the per-layer detail figures.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from covshift import plots
from covshift.panels import (
    DEFAULT_MAX_POINTS,
    HEATMAP_EXTRA,
    INCH_PER_ROW,
    PANEL_SIZE,
    StepAxis,
    as_written,
    label_inches,
    metric_label,
    new_grid,
    not_recorded,
    reference_words,
    spans_decades,
    steps_axis,
    thinned,
    title,
)
from covshift.run import Run

#: Layers that get detail figures by default: the most drifting.
DEFAULT_TOP = 8


def select_layers(runs: Sequence[Run], layers: str | Sequence[str] | None = None) -> list[str]:
    """Layers of any of ``runs`` in model order, filtered by names or glob patterns.

    A layer only some runs have goes after the layer that precedes it in its run:
    ``conv, fc`` and ``conv, bn, fc`` give ``conv, bn, fc``.

    Raises:
        ValueError: a name or pattern matches no recorded layer (the message lists them).
    """
    names: list[str] = []
    for run in runs:
        position = 0  # a layer new to the list goes right after this run's previous layer
        for name in map(str, run.layers["layer"]):
            if name in names:
                position = names.index(name) + 1
            else:
                names.insert(position, name)
                position += 1
    if layers is None:
        return names
    patterns = [layers] if isinstance(layers, str) else list(layers)
    chosen: set[str] = set()
    for pattern in patterns:
        matched = [name for name in names if fnmatch.fnmatchcase(name, str(pattern))]
        if not matched:
            raise ValueError(f"layers={pattern!r} matches no recorded layer; recorded: {', '.join(names)}")
        chosen.update(matched)
    return [name for name in names if name in chosen]


def rank_layers(drifts: Sequence[pd.DataFrame], metric: str) -> pd.Series:
    """Each layer's drift score, largest first: its ``metric`` drift averaged over the recorded steps,
    the largest over the runs (a layer only some runs have is scored by those).

    Layers without a finite value come last, in their order in ``drifts``.

    >>> frame = pd.DataFrame({"step": [0, 1, 0, 1], "layer": ["a", "a", "b", "b"],
    ...                       "metric": "wasserstein", "value": [0.0, 0.2, 0.0, 0.6]})
    >>> rank_layers([frame], "wasserstein").to_dict()
    {'b': 0.3, 'a': 0.1}
    """
    scores = [frame[frame["metric"] == metric].groupby(frame["layer"].astype(str), sort=False)["value"].mean()
              for frame in drifts]
    order = list(dict.fromkeys(name for score in scores for name in score.index))
    best = pd.concat([score.reindex(order) for score in scores], axis=1).max(axis=1)
    return best.sort_values(ascending=False, na_position="last", kind="stable")


def detail_layers(layers: Sequence[str], top: Sequence[str], asked: Collection[str]) -> list[str]:
    """The layers that get detail figures, in ``layers``' (model) order: the ``top`` ones and those ``asked`` for.

    >>> detail_layers(["a", "b", "c", "d"], top=["c", "a"], asked={"d"})
    ['a', 'c', 'd']
    """
    chosen = set(top) | set(asked)
    return [layer for layer in layers if layer in chosen]


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
    fig, axes = new_grid(len(metrics), len(labels), sharex=True, sharey=True, margin=label_inches(layers),
                         row_height=max(PANEL_SIZE[1], INCH_PER_ROW * len(layers) + HEATMAP_EXTRA))
    for row, metric in enumerate(metrics):
        parts = [_without_reference(thinned(frame[frame["metric"] == metric], max_points, xlim), reference)
                 for frame in drifts]
        norm = _shared_norm(np.concatenate([p["value"].to_numpy(dtype=float) for p in parts]))
        meshes = []
        for col, (label, part_frame) in enumerate(zip(labels, parts)):
            ax = axes[row, col]
            steps_axis(ax, xlim)  # before drawing: columns are placed on the axis' scale
            meshes.append(plots.drift_heatmap(part_frame, layers, ax=ax, norm=norm))
            ax.set_title(as_written(label), fontsize=10)
            ax.set_yticks(np.arange(len(layers)), [as_written(layer) for layer in layers])
            for tick, layer in zip(ax.get_yticklabels(), layers):
                tick.set_fontweight("bold" if layer in emphasize else "normal")
            _hatch_reference(ax, drifts[col], reference)
            if part_frame["value"].notna().sum() == 0:
                not_recorded(ax, "fewer than 2 recorded steps: no drift")
        axes[row, 0].set_ylabel("layer")
        fig.colorbar(meshes[0], ax=list(axes[row]), label=metric_label(metric), shrink=0.9)
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
