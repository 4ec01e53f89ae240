"""Figure primitives: each draws one view on one matplotlib Axes and returns what it drew.

Every function takes tidy DataFrames (as :meth:`covshift.Run.stats` and
:func:`covshift.drift` return them) and an optional ``ax``; without one it makes
a new object-oriented :class:`~matplotlib.figure.Figure` (no pyplot state).

>>> import pandas as pd
>>> frame = pd.DataFrame({"step": [0, 1, 2], "value": [0.0, 0.2, 0.5]})
>>> lines = drift_line(frame, label="plain")
>>> lines[0].get_label()
'plain'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.collections import QuadMesh
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

#: Percentile levels drawn as lines (the BatchNorm paper's Figure 1) and as the faint band.
PERCENTILE_STYLES = {"q0.15": ("15th", ":"), "q0.5": ("50th", "-"), "q0.85": ("85th", "--")}  # name, style
PERCENTILE_LINES = tuple(PERCENTILE_STYLES)
PERCENTILE_BAND = ("q0.01", "q0.99")


def axes_or_new(ax: Axes | None) -> Axes:
    """``ax``, or the Axes of a new object-oriented Figure."""
    if ax is not None:
        return ax
    return Figure(layout="constrained").add_subplot()


def thinned_steps(steps: np.ndarray | pd.Series, max_points: int, linthresh: float | None = None) -> np.ndarray:
    """At most ``max_points`` of the sorted unique ``steps``, first and last kept.

    Evenly spaced by position; with ``linthresh`` (a symlog step axis), the steps
    nearest to points evenly spaced in ``log(1 + step / linthresh)``, so that early
    decades keep their steps on a log axis.

    >>> thinned_steps(np.arange(10), 4).tolist()
    [0, 3, 6, 9]
    >>> thinned_steps(np.arange(0, 10_000, 10), 5, linthresh=10).tolist()
    [0, 50, 310, 1770, 9990]
    """
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points!r}")
    unique = np.unique(np.asarray(steps))
    if len(unique) <= max_points:
        return unique
    if linthresh is None:
        return unique[np.unique(np.linspace(0, len(unique) - 1, max_points).round().astype(int))]
    where = np.log1p(np.maximum(unique, 0) / linthresh)
    targets = np.linspace(where[0], where[-1], max_points)
    right = np.clip(np.searchsorted(where, targets), 1, len(unique) - 1)
    nearest = np.where(targets - where[right - 1] <= where[right] - targets, right - 1, right)
    return unique[np.unique(nearest)]


def percentile_trajectory(frame: pd.DataFrame, *, ax: Axes | None = None, color: str = "C0") -> list[Artist]:
    """The 15th, 50th and 85th percentiles over steps, with the 1st–99th band faint.

    Args:
        frame: one row per step with column ``step`` and the quantile columns
            ``q0.01, q0.15, q0.5, q0.85, q0.99``.
        ax: the Axes to draw on (default: a new Figure's).
        color: colour of the lines and the band.

    Returns:
        The band (a PolyCollection) and the three lines (15th, 50th, 85th).
    """
    ax = axes_or_new(ax)
    frame = frame.sort_values("step")
    low, high = PERCENTILE_BAND
    band = ax.fill_between(frame["step"], frame[low], frame[high], color=color, alpha=0.15, linewidth=0,
                           label="1st–99th")
    lines = [
        ax.plot(frame["step"], frame[q], color=color, linestyle=style, linewidth=1.4, label=name)[0]
        for q, (name, style) in PERCENTILE_STYLES.items()
    ]
    return [band, *lines]


def drift_line(
    frame: pd.DataFrame,
    *,
    ax: Axes | None = None,
    color: str = "C0",
    label: str | None = None,
    noise: pd.DataFrame | None = None,
    null: pd.DataFrame | None = None,
) -> list[Line2D]:
    """Drift over steps as a solid line, its noise floor dashed and its null 95th percentile dotted, one colour.

    Args:
        frame: columns ``step`` and ``value`` (one layer, one metric).
        ax: the Axes to draw on (default: a new Figure's).
        color: line colour.
        label: legend label of the drift line.
        noise: optional noise floor, columns ``step`` and ``value``.
        null: optional null floor (:mod:`covshift.science.null_floor`), columns ``step`` and ``null_q95``; each
            measurement holds until the next one, the last to the drift's last step.

    Returns:
        The drift line, then the noise-floor line when ``noise`` has rows, then the null line when ``null`` has.
    """
    ax = axes_or_new(ax)
    frame = frame.sort_values("step")
    lines = ax.plot(frame["step"], frame["value"], color=color, linewidth=1.5, label=label)
    if noise is not None and len(noise):
        noise = noise.sort_values("step")
        lines += ax.plot(noise["step"], noise["value"], color=color, linewidth=1.0, linestyle="--", alpha=0.8,
                         label=None if label is None else f"{label} noise floor")
    if null is not None and len(null):
        null = null.sort_values("step")
        steps = [*null["step"], max(null["step"].iloc[-1], frame["step"].max() if len(frame) else 0)]
        values = [*null["null_q95"], null["null_q95"].iloc[-1]]
        lines += ax.plot(steps, values, color=color, linewidth=1.2, linestyle=":", drawstyle="steps-post",
                         label=None if label is None else f"{label} null 95th pct")
    return lines


def drift_heatmap(
    frame: pd.DataFrame,
    layers: Sequence[str],
    *,
    ax: Axes | None = None,
    norm: Normalize | None = None,
    cmap: str = "viridis",
) -> QuadMesh:
    """A layer × step heatmap of drift (layers top to bottom in model order).

    Each column is placed at its step on ``ax``'s x scale (set a log scale before drawing).

    Args:
        frame: columns ``step``, ``layer`` and ``value`` (one metric).
        layers: the rows, in order; a layer missing from ``frame`` is left grey.
        ax: the Axes to draw on (default: a new Figure's).
        norm: colour normalization; share one between Axes for a shared scale.
        cmap: colour map name.

    Returns:
        The QuadMesh (pass it to ``Figure.colorbar``).
    """
    ax = axes_or_new(ax)
    grid = frame.pivot_table(index="layer", columns="step", values="value", aggfunc="mean", observed=True)
    grid = grid.reindex(index=list(layers))
    steps = grid.columns.to_numpy(dtype=float)
    edges = cell_edges(steps, ax) if len(steps) else np.array([0.0, 1.0])
    rows = np.arange(len(layers) + 1) - 0.5
    values = np.ma.masked_invalid(grid.to_numpy(dtype=float)) if len(steps) else np.ma.masked_all((len(layers), 1))
    mesh = ax.pcolormesh(edges, rows, values, norm=norm, cmap=cmap, shading="flat")
    ax.set_facecolor("0.92")  # cells without a value (layer not recorded) show as light grey
    ax.set_yticks(np.arange(len(layers)), [str(layer) for layer in layers])
    ax.set_ylim(len(layers) - 0.5, -0.5)
    return mesh


def channel_boxes(
    values: Sequence[np.ndarray],
    positions: Sequence[float],
    *,
    ax: Axes | None = None,
    color: str = "C0",
    width: float = 0.35,
) -> dict[str, list[Artist]]:
    """Box plots of per-channel values (one box per position), with every channel as a dot.

    Args:
        values: one array of per-channel values per box.
        positions: x position of each box.
        ax: the Axes to draw on (default: a new Figure's).
        color: colour of the boxes and dots.
        width: box width in x units.

    Returns:
        Matplotlib's boxplot dict plus ``"points"``: the scatter of every channel.
    """
    ax = axes_or_new(ax)
    values = [np.asarray(v, dtype=float)[np.isfinite(v)] for v in values]
    boxes = ax.boxplot(values, positions=list(positions), widths=width, patch_artist=True, showfliers=False,
                       manage_ticks=False, medianprops={"color": "black", "linewidth": 1.2})
    for box in boxes["boxes"]:
        box.set(facecolor=color, alpha=0.35, edgecolor=color)
    rng = np.random.default_rng(0)
    xs = np.concatenate([np.full(len(v), p) for v, p in zip(values, positions)]) if values else np.empty(0)
    ys = np.concatenate(values) if values else np.empty(0)
    jitter = rng.uniform(-width / 3, width / 3, len(xs))
    boxes["points"] = [ax.scatter(xs + jitter, ys, s=6, color=color, alpha=0.6, linewidths=0)]
    return boxes


def training_curve(
    curves: pd.DataFrame,
    column: str,
    *,
    ax: Axes | None = None,
    color: str = "C0",
    label: str | None = None,
    linestyle: str = "-",
) -> list[Line2D]:
    """One logged training curve (e.g. ``train_loss``) over steps; rows missing the value are skipped.

    Returns:
        The line, or an empty list when ``curves`` has no such column.
    """
    ax = axes_or_new(ax)
    if column not in curves:
        return []
    frame = curves[["step", column]].dropna().sort_values("step")
    return ax.plot(frame["step"], frame[column], color=color, linestyle=linestyle, linewidth=1.4, label=label)


def cell_edges(centers: np.ndarray, ax: Axes) -> np.ndarray:
    """Cell edges around sorted cell centres, half-way between neighbours on ``ax``'s x scale.

    >>> cell_edges(np.array([0.0, 1.0, 3.0]), Figure().add_subplot()).tolist()
    [-0.5, 0.5, 2.0, 4.0]
    """
    if len(centers) == 1:
        return np.array([centers[0] - 0.5, centers[0] + 0.5])
    scale = ax.xaxis.get_transform()
    where = scale.transform(np.asarray(centers, dtype=float))
    middle = (where[1:] + where[:-1]) / 2
    edges = np.concatenate([[2 * where[0] - middle[0]], middle, [2 * where[-1] - middle[-1]]])
    return scale.inverted().transform(edges)


#: The values of a gradient ICS frame that :func:`plot_gradient_ics` draws.
GRADIENT_VALUES = ("grad_norm", "ics_norm", "relative", "cosine")


def plot_gradient_ics(frame: Any, value: str = "ics_norm", ax: Any = None) -> Any:
    """Gradient ICS (:class:`covshift.science.gradient_ics.GradientICS` rows): one line per layer of ``value`` (``ics_norm``, ``relative``, ``cosine`` or ``grad_norm``) against step.

    Returns the Axes drawn on.
    """
    if value not in GRADIENT_VALUES:
        raise ValueError(f"value must be one of {GRADIENT_VALUES}, got {value!r}")
    ax = axes_or_new(ax)
    for layer, rows in frame.groupby("layer", observed=True, sort=False):
        ax.plot(rows["step"], rows[value], label=str(layer), marker="." if len(rows) < 30 else None)
    labels = {"ics_norm": "‖G − G'‖₂", "relative": "‖G − G'‖₂ / ‖G‖₂", "cosine": "cos∠(G, G')",
              "grad_norm": "‖G‖₂"}
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(labels[value])
    ax.set_title("gradient ICS (Santurkar et al. 2018)")
    ax.legend(title="layer", fontsize="small")
    return ax
