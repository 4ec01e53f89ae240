"""``covshift.plot``: one view of one layer of a run, drawn on an Axes you may pass in."""

from __future__ import annotations

from pathlib import Path

from matplotlib.artist import Artist
from matplotlib.axes import Axes

from covshift.checks import check_choice
from covshift.metrics import get as get_metric
from covshift.metrics.api import drift, has_probe, noise_floor
from covshift.reporting import plots
from covshift.reporting.data import layer_percentiles
from covshift.reporting.text import reference_words
from covshift.store.run import Run, load

#: What :func:`plot` can draw.
KINDS = ("percentiles", "drift")


def plot(
    run: Run | str | Path,
    layer: str,
    kind: str = "percentiles",
    ax: Axes | None = None,
    *,
    metric: str = "wasserstein",
    reference: str | int = "initial",
    source: str = "train",
    channel: int | None = None,
    color: str = "C0",
) -> list[Artist]:
    """Draw one layer of ``run`` on ``ax`` (default: a new Figure's Axes) and return what was drawn.

    Args:
        run: a :class:`~covshift.Run` or a run directory.
        layer: the layer's name, as in ``run.layers``.
        kind: ``"percentiles"``: the 15th/50th/85th percentiles of the layer's input
            over the steps, 1st–99th faint (mean over channels, or ``channel``);
            ``"drift"``: the layer's ``metric`` drift from ``reference``, with the
            noise floor dashed when the run has a probe.
        ax: the matplotlib Axes to draw on.
        metric, reference: of the drift (``kind="drift"``), as in :func:`covshift.drift`.
        source: records to draw: ``"train"`` or ``"probe"``.
        channel: one channel's percentiles instead of the mean over channels.
        color: colour of the lines.

    Returns:
        The artists drawn: for percentiles the band and the three lines, for
        drift the drift line and, with a probe, the noise-floor line. Their
        ``.axes`` (and ``.figure``) is where they were drawn.

    Raises:
        ValueError: an unknown ``kind`` or ``layer``.
    """
    check_choice("kind", kind, KINDS)
    run = run if isinstance(run, Run) else load(run)
    names = run.layers["layer"].tolist()
    if layer not in names:
        raise ValueError(f"layer {layer!r} is not in run {run.name!r}; its layers are {names}")
    ax = plots.axes_or_new(ax)
    if kind == "percentiles":
        stats = run.stats(source=source)
        frame = layer_percentiles(stats[stats["layer"] == layer], channel)
        artists = plots.percentile_trajectory(frame, ax=ax, color=color)
        what = "mean over channels" if channel is None else f"channel {channel}"
        ax.set_title(f"{run.name} · layer {layer} ({what})", fontsize=10)
        ax.set_ylabel("input value")
    else:
        values = drift(run, metric=metric, reference=reference, source=source)
        floor = None
        if has_probe(run):
            floor = noise_floor(run, metric=metric)
            floor = floor[floor["layer"] == layer]
        artists = plots.drift_line(values[values["layer"] == layer], ax=ax, color=color, label=run.name,
                                   noise=floor)
        ax.set_title(f"{get_metric(metric).axis_label()} · layer {layer}, from the {reference_words(reference)}",
                     fontsize=10)
        ax.set_ylabel("drift")
    ax.set_xlabel("training step")
    return artists
