"""Shared pieces of the report's figures: panel grid, names as text, metric names, scales, step axis, titles."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import NamedTuple, TypeVar

import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from covshift.defaults import MAX_HEIGHT_PX
from covshift.reporting import plots

#: Width and height of one panel, inches.
PANEL_SIZE = (4.0, 2.8)
#: Resolution of the saved figures, dots per inch.
DPI = 100
#: Positive values spanning more than this ratio are drawn on a log scale.
LOG_SPAN = 100.0
#: Recorded steps spanning more than this ratio (last / first positive step) get a log step axis.
STEP_LOG_SPAN = 1000.0

def as_written(name: object) -> str:
    r"""``name`` for a matplotlib text, shown exactly as written: ``$`` escaped so it never starts mathtext.

    >>> as_written("budget $5 to $10")
    'budget \\$5 to \\$10'
    """
    return str(name).replace("$", r"\$")


#: Characters per line of a layer name in an axis label; longer names wrap at their dots.
NAME_WIDTH = 28
#: Inches a character of a tick label takes (font size 10 at :data:`DPI`), to make room for names.
INCH_PER_CHAR = 0.075
#: Inches between two layer rows of a heatmap, so their names never overlap.
INCH_PER_ROW = 0.17
#: Inches a heatmap panel adds to its rows (title, step axis).
HEATMAP_EXTRA = 1.0
#: Layer rows per page of a figure with a panel per layer (percentiles, drift) within :data:`MAX_HEIGHT_PX`.
ROWS_PER_PAGE = int(MAX_HEIGHT_PX // (PANEL_SIZE[1] * DPI))
#: Layers per heatmap page within :data:`MAX_HEIGHT_PX`.
HEATMAP_ROWS_PER_PAGE = int((MAX_HEIGHT_PX / DPI - HEATMAP_EXTRA) / INCH_PER_ROW)

T = TypeVar("T")


def paged(items: Sequence[T], size: int) -> list[list[T]]:
    """``items`` cut into pages of at most ``size`` (one empty page for no items).

    >>> paged("abcde", 2)
    [['a', 'b'], ['c', 'd'], ['e']]
    """
    return [list(items[i:i + size]) for i in range(0, len(items), size)] or [[]]


def wrapped_name(name: object, width: int = NAME_WIDTH) -> str:
    """A layer name for an axis label, broken at its dots into lines of at most ``width`` characters.

    >>> print(wrapped_name("bert.encoder.layer.0.attention.self.query", 20))
    bert.encoder.layer.
    0.attention.self.
    query
    """
    lines = [""]
    for piece in (f"{part}." for part in str(name).split(".")):
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return as_written("\n".join(lines)[:-1])


#: Inches of tick label a panel of :data:`PANEL_SIZE` already has room for.
LABEL_ROOM = 1.0


def label_inches(names: Sequence[object]) -> float:
    """Inches to add to a figure so that the longest of ``names`` fits as a tick label."""
    return max(0.0, INCH_PER_CHAR * max((len(str(name)) for name in names), default=0) - LABEL_ROOM)


def run_colors(n: int) -> list[str]:
    """One colour per run, the same in every figure: ``C0, C1, …``."""
    return [f"C{i % 10}" for i in range(n)]


def panel_grid(
    rows: int, cols: int, *, sharex: bool | str = True, sharey: bool | str = False, margin: float = 0.0,
    row_height: float | None = None,
) -> tuple[Figure, np.ndarray]:
    """A constrained-layout Figure of ``rows × cols`` panels of :data:`PANEL_SIZE`; axes as a 2-D array.

    ``margin`` adds inches on the left for long tick labels; ``row_height`` overrides a panel's height.
    """
    width, height = PANEL_SIZE
    height = row_height or height
    fig = Figure(figsize=(width * cols + margin, height * rows), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, sharex=sharex, sharey=sharey, squeeze=False)
    return fig, axes


def spans_decades(values: np.ndarray | pd.Series, span: float = LOG_SPAN) -> bool:
    """Whether the positive finite ``values`` span more than ``span`` (max/min).

    >>> spans_decades(np.array([0.0, 0.001, 1.0])), spans_decades(np.array([1.0, 5.0]))
    (True, False)
    """
    values = np.asarray(values, dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    return bool(len(positive) > 1 and positive.max() / positive.min() > span)


class StepAxis(NamedTuple):
    """The step axis every figure shares: its range and, for a log axis, symlog's linear part ``[0, linthresh]``.

    A plain ``(lo, hi)`` tuple is a linear axis.
    """

    lo: float
    hi: float
    linthresh: float | None = None


def choose_step_axis(steps: np.ndarray, log_schedule: bool = False) -> StepAxis:
    """The axis for recorded ``steps``: symlog (step 0 stays on it) when the runs record on a log
    schedule or the positive steps span more than :data:`STEP_LOG_SPAN`, linear otherwise.

    >>> choose_step_axis(np.array([0, 10, 20]))
    StepAxis(lo=0.0, hi=20.0, linthresh=None)
    >>> choose_step_axis(np.array([0, 10, 100, 100_000]))
    StepAxis(lo=0.0, hi=100000.0, linthresh=10.0)
    """
    steps = np.asarray(steps, dtype=float)
    lo, hi = float(steps.min()), float(steps.max())
    positive = steps[steps > 0]
    if len(positive) > 1 and (log_schedule or spans_decades(positive, STEP_LOG_SPAN)):
        return StepAxis(lo, hi, float(positive.min()))
    return StepAxis(lo, hi)


#: Lines of at most this many points get a marker at each point.
FEW_POINTS = 12


def mark_few(lines: Sequence[Artist]) -> None:
    """A marker on every point of lines with few points (a line of 1 or 2 points is otherwise easy to miss)."""
    for line in lines:
        if isinstance(line, Line2D) and len(line.get_xdata()) <= FEW_POINTS:
            line.set(marker="o", markersize=4)


def set_step_axis(ax: Axes, xlim: StepAxis | tuple[float, float] | None) -> None:
    """Put the step axis on the range and scale every figure shares (a little margin either side)."""
    axis = StepAxis(*xlim) if xlim is not None else None
    if axis is not None and axis.linthresh is not None:
        ax.set_xscale("symlog", linthresh=axis.linthresh, linscale=0.5)
        forward = ax.xaxis.get_transform()
        lo, hi = forward.transform([axis.lo, axis.hi])
        pad = (hi - lo) * 0.03 if hi > lo else 1.0
        ax.set_xlim(*forward.inverted().transform([lo - pad, hi + pad]))
        return
    if axis is not None:
        pad = (axis.hi - axis.lo) * 0.03 if axis.hi > axis.lo else 1.0
        ax.set_xlim(axis.lo - pad, axis.hi + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers


def rows_at_thinned_steps(frame: pd.DataFrame, max_points: int, xlim: StepAxis | tuple[float, float] | None = None) -> pd.DataFrame:
    """``frame``'s rows at no more than ``max_points`` steps, spread evenly along the (log or linear) step axis."""
    linthresh = StepAxis(*xlim).linthresh if xlim is not None else None
    return frame[frame["step"].isin(plots.thinned_steps(frame["step"], max_points, linthresh))]


def not_recorded(ax: Axes, text: str = "not recorded in this run") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.5", fontsize=9)


def legend(fig: Figure, handles: list[Artist], cols: int) -> None:
    """A figure legend below the panels, two entries per panel width at most per row."""
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=max(1, min(len(handles), 2 * cols)),
                   fontsize=9)


def title(fig: Figure, text: str, cols: int) -> None:
    """The figure title, wrapped to the figure's width (about 38 characters per panel)."""
    fig.suptitle(textwrap.fill(text, width=int(cols * PANEL_SIZE[0] * 9.5)), fontsize=12)


