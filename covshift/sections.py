"""What the report draws: the numbers, computed once from the runs (:class:`ReportData`), and its
figures in page order (:func:`build_sections`).

Layer-level numbers of every layer come from :func:`covshift.drift`; per-channel
records are read only for the few layers that get detail figures, one layer at
a time, through :func:`_layer_stats`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from covshift import figures
from covshift.drift import drift, has_probe, noise_floor
from covshift.gradients import GRADIENTS_FILE, load_gradient_ics
from covshift.noise import NULL_FILE, load_null_floor
from covshift.overview import (
    DEFAULT_TOP,
    detail_layers,
    heatmap_figure,
    rank_layers,
    select_layers,
)
from covshift.page import verdict_metric
from covshift.panels import (
    HEATMAP_ROWS_PER_PAGE,
    ROWS_PER_PAGE,
    StepAxis,
    paged,
    step_axis,
)
from covshift.run import Run
from covshift.schedule import LogSpaced, from_config

#: Metrics per drift figure (columns); more metrics go to further figures, so text stays readable.
METRICS_PER_FIGURE = 3


@dataclass
class Section:
    """One figure of the report: its file, heading, how to read it, and how to draw it."""

    name: str
    title: str
    caption: str
    draw: Callable[[], Figure] = field(repr=False)

    @property
    def file(self) -> str:
        return f"{self.name}.png"

    @property
    def figure(self) -> Figure:
        """The figure, drawn anew on each access (the report draws, saves and drops one at a time)."""
        return self.draw()


def _layer_stats(run: Run, layers: Sequence[str], source: str) -> pd.DataFrame:
    """``run.stats(source)`` rows of ``layers`` only (those ``run`` recorded): the one place the report reads
    per-channel records, and only those row groups are read."""
    recorded = set(run.layers["layer"])
    return run.stats(source, layers=[name for name in layers if name in recorded])


def _empty(columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=float) for name in columns})


@dataclass
class ReportData:
    """Everything the figures and the tables need, computed once from the runs (lists: one item per run)."""

    drifts: list[pd.DataFrame]  # layer drift (mean over channels) of every layer and metric, per step
    medians: list[pd.Series]  # per layer: the verdict metric's channel-median drift, mean over steps
    noises: list[pd.DataFrame | None]  # probe-halves noise floor (None: no probe)
    nulls: list[pd.DataFrame | None]  # null floor of covshift.noise (None: not recorded)
    gradients: list[pd.DataFrame | None]  # gradient ICS of covshift.gradients (None: not recorded)
    curves: list[pd.DataFrame]
    log_schedule: bool = False  # some run recorded on a log-spaced schedule
    ranked: list[str] = field(default_factory=list)  # the top layers by drift, most first
    detail: list[str] = field(default_factory=list)  # layers with detail figures, in model order
    percentiles: list[pd.DataFrame] = field(default_factory=list)  # detail layers
    last_drifts: list[pd.DataFrame] = field(default_factory=list)  # detail layers, per channel, last step
    steps: list[int] = field(default_factory=list)  # recorded steps of each run (of the drawn source)

    @property
    def xlim(self) -> StepAxis:
        """The step axis every figure shares: the steps of all runs' drift, records, curves and gradient ICS."""
        frames = [*self.drifts, *self.percentiles, *self.curves, *(g for g in self.gradients if g is not None)]
        steps = [frame["step"].to_numpy(dtype=float) for frame in frames if len(frame)]
        return step_axis(np.concatenate(steps) if steps else np.zeros(1), self.log_schedule)

    @classmethod
    def compute(
        cls,
        runs: Sequence[Run],
        metrics: Sequence[str],
        *,
        reference: str | int,
        source: str,
        channel: int | None,
        top: int = DEFAULT_TOP,
        asked: Collection[str] = (),
        progress: Any = None,
    ) -> ReportData:
        """Layer-level drift of every layer, the ``top`` layers by drift, and detail of those and of ``asked``.

        ``progress`` is a tqdm bar (or None) advanced once per run and per detail layer of each run.
        """
        metric = verdict_metric(metrics)
        data = cls([], [], [], [], [], [])
        _grow(progress, len(runs))
        for run in runs:
            data._add_overview(run, metrics, metric, reference=reference, source=source)
            _advance(progress, f"drift of {run.name}")
        data.ranked = list(rank_layers(data.drifts, metric).index[:top])
        data.detail = detail_layers(select_layers(runs), data.ranked, asked)
        _grow(progress, len(runs) * len(data.detail))
        for run, layer_drift in zip(runs, data.drifts):
            seen = set(layer_drift["step"].unique())
            percentiles, last = [], []
            for layer in data.detail:
                stats = _layer_stats(run, [layer], source)
                _advance(progress, f"{run.name} · {layer}")
                if stats.empty:
                    continue
                seen.update(stats["step"].unique())
                percentiles.append(figures.layer_percentiles(stats, channel))
                if stats["step"].nunique() > 1:
                    channels = drift(stats, metric=list(metrics), reference=reference, by="channel", source=source)
                    last.append(channels[channels["step"] == channels["step"].max()])
            data.percentiles.append(pd.concat(percentiles, ignore_index=True) if percentiles
                                    else _empty(["step", "layer"]))
            data.last_drifts.append(pd.concat(last, ignore_index=True) if last
                                    else _empty(["step", "layer", "channel", "metric", "value"]))
            data.steps.append(len(seen))
        return data

    def _add_overview(self, run: Run, metrics: Sequence[str], metric: str, *, reference: str | int,
                      source: str) -> None:
        """The run's layer drift (by the channel mean, and by the median for the verdict), floors and extras."""
        try:
            layer_drift = drift(run, metric=list(metrics), reference=reference, source=source)
            median = drift(run, metric=metric, reference=reference, source=source, agg="median")
        except ValueError as err:
            raise ValueError(f"run {run.name!r} ({run.directory}): {err}") from None
        self.drifts.append(layer_drift)
        self.medians.append(median.groupby(median["layer"].astype(str))["value"].mean())
        self.noises.append(noise_floor(run, metric=list(metrics)) if has_probe(run) else None)
        directory = Path(run.directory)
        null = load_null_floor(directory) if (directory / NULL_FILE).is_file() else None
        self.nulls.append(null[null["metric"].isin(metrics)] if null is not None and len(null) else None)
        self.gradients.append(load_gradient_ics(directory) if (directory / GRADIENTS_FILE).is_file() else None)
        self.curves.append(run.curves())
        self.log_schedule = self.log_schedule or isinstance(from_config(run.meta.get("config") or {}), LogSpaced)


def _grow(progress: Any, n: int) -> None:
    if progress is not None:
        progress.total = (progress.total or 0) + n
        progress.refresh()


def _advance(progress: Any, what: str) -> None:
    if progress is not None:
        progress.set_postfix_str(what, refresh=False)
        progress.update(1)


def build_sections(
    data: ReportData,
    labels: Sequence[str],
    layers: Sequence[str],
    metrics: Sequence[str],
    *,
    reference: str | int,
    max_points: int,
    channel: int | None,
    source: str,
) -> list[Section]:
    """The report's figures with their headings and captions, in page order.

    The overview first: the heatmap of every one of ``layers`` in pages of at
    most :data:`~covshift.panels.HEATMAP_ROWS_PER_PAGE`. Then the detail figures
    of ``data.detail``, :data:`~covshift.panels.ROWS_PER_PAGE` layers per page; the
    drift figures hold at most :data:`METRICS_PER_FIGURE` metrics each. Without 2
    recorded steps in any run there is no drift, and no heatmap or drift figure.
    Then the training curves and gradient ICS, when the runs hold them.
    """
    what = "mean over channels" if channel is None else f"channel {channel}"
    xlim = data.xlim
    metric = verdict_metric(metrics)
    log = " The step axis is logarithmic (linear from 0 to the first recorded step)." if xlim.linthresh else ""
    drifted = max(data.steps) >= 2
    sections: list[Section] = []
    if drifted:
        pages = paged(layers, HEATMAP_ROWS_PER_PAGE)
        for k, page in enumerate(pages, start=1):
            part = f"layers {layers.index(page[0]) + 1}–{layers.index(page[-1]) + 1} of {len(layers)}" \
                if len(pages) > 1 else ""
            sections.append(Section(
                _numbered("heatmap", k), _titled("Layer × step heatmap", k, len(pages)),
                f"{figures.metric_label(metric)} drift of every layer (mean over its channels) at every drawn step, "
                "one panel per run, with one colour scale shared by all runs and pages: the same colour is the "
                "same amount of drift everywhere. Layers in bold have detail figures below. Grey rows are layers "
                "the run does not have; the hatched column is the reference step itself (0 by definition, so not "
                "a measurement of low drift)." + log,
                partial(heatmap_figure, data.drifts, labels, page, [metric], reference=reference,
                        max_points=max_points, xlim=xlim, emphasize=set(data.detail), part=part),
            ))
    detail_pages = paged(data.detail, ROWS_PER_PAGE) if data.detail else []
    for k, page in enumerate(detail_pages, start=1):
        sections.append(Section(
            _numbered("percentiles", k), _titled("Percentile trajectories", k, len(detail_pages)),
            f"The 15th (dotted), 50th (solid) and 85th (dashed) percentiles of each layer's input over training "
            f"({what}, {source} batches), with the 1st–99th percentile band faint: the view of Figure 1 in the "
            "BatchNorm paper. Flat, steady bands mean a stable input distribution; bands that climb, widen or "
            "narrow are covariate shift. Runs are side by side, with the same y axis along each row." + log,
            partial(figures.percentiles_figure, data.percentiles, labels, page, max_points=max_points, what=what,
                    xlim=xlim),
        ))
    if drifted and detail_pages:
        chunks = [metrics[i:i + METRICS_PER_FIGURE] for i in range(0, len(metrics), METRICS_PER_FIGURE)]
        drift_pages = [(page, chunk) for page in detail_pages for chunk in chunks]
        null = (" The dotted line is the run's null 95th percentile (covshift.noise): 95% of the drift that "
                "sampling alone produces lies below it.") if any(n is not None for n in data.nulls) else ""
        for k, (page, chunk) in enumerate(drift_pages, start=1):
            sections.append(Section(
                _numbered("drift", k), _titled("Drift over training", k, len(drift_pages)),
                "Each layer's drift (mean over its channels) from the reference, one row per layer and one column "
                "per metric; runs overlaid in their colours, each panel on its own y scale. The dashed line in the "
                "same colour is the noise floor." + null + " Drift well above its floor is real change of the "
                "input distribution. Where two runs' lines coincide (e.g. the input layer, which reads the same "
                "data), the panel says so and the line underneath is drawn wide." + log,
                partial(figures.drift_figure, data.drifts, data.noises, labels, page, chunk, reference=reference,
                        max_points=max_points, xlim=xlim, nulls=data.nulls),
            ))
        for k, page in enumerate(detail_pages, start=1):
            sections.append(Section(
                _numbered("channels", k), _titled("Per-channel drift at the end of training", k, len(detail_pages)),
                "The drift of every channel of each layer at the run's last recorded step: a box for the quartiles "
                "(line: median) and a dot per channel. A tall box or stray dots mean a few channels moved much "
                "more than the rest, which the layer mean hides.",
                partial(figures.channels_figure, data.last_drifts, labels, page, metrics, data.steps),
            ))
    if any(not frame.empty for frame in data.curves):
        sections.append(Section(
            "curves", "Training curves",
            "Loss and accuracy the runs logged with run.log(): train solid, test dashed, on the same step axis "
            "as the figures above.",
            partial(figures.curves_figure, data.curves, labels, xlim=xlim),
        ))
    if any(frame is not None for frame in data.gradients):
        sections.append(Section(
            "gradient-ics", "Gradient ICS",
            "Gradient internal covariate shift (Santurkar et al. 2018), as covshift.gradients.GradientICS "
            "recorded it: per layer with parameters, ‖G − G'‖ (top), how much the layer's gradient G changes when "
            "only the layers before it take their optimizer step (G'), and cos∠(G, G') (bottom: 1 is no change "
            "of direction). The first layer has no earlier layer: its ‖G − G'‖ is 0 by definition. Runs side by "
            "side, y shared along a row.",
            partial(figures.gradient_ics_figure, data.gradients, labels, xlim=xlim),
        ))
    return sections


def _numbered(name: str, k: int) -> str:
    return name if k == 1 else f"{name}-{k}"


def _titled(heading: str, k: int, n: int) -> str:
    return heading + (f" ({k} of {n})" if n > 1 else "")
