"""The report's figures in page order (:func:`build_sections`), each drawn from :class:`ReportData` when saved."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from matplotlib.figure import Figure

from covshift.metrics import get as get_metric
from covshift.reporting import figures
from covshift.reporting.data import ReportData
from covshift.reporting.verdicts import verdict_metric
from covshift.reporting.heatmap import heatmap_figure
from covshift.reporting.panels import HEATMAP_ROWS_PER_PAGE, ROWS_PER_PAGE, StepAxis, choose_step_axis, paged

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


def build_sections(
    data: ReportData,
    metrics: Sequence[str],
    *,
    reference: str | int,
    max_points: int,
    channel: int | None,
    source: str,
) -> list[Section]:
    """The report's figures with their headings and captions, in page order.

    The overview first: the heatmap of every layer in pages of at
    most :data:`~covshift.reporting.panels.HEATMAP_ROWS_PER_PAGE`. Then the detail figures
    of ``data.detail``, :data:`~covshift.reporting.panels.ROWS_PER_PAGE` layers per page; the
    drift figures hold at most :data:`METRICS_PER_FIGURE` metrics each. Without 2
    recorded steps in any run there is no drift, and no heatmap or drift figure.
    Then the training curves and gradient ICS, when the runs hold them.
    """
    labels, layers = data.labels, data.layers
    what = "mean over channels" if channel is None else f"channel {channel}"
    xlim = shared_step_axis(data)
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
                f"{get_metric(metric).axis_label()} drift of every layer (mean over its channels) at every drawn step, "
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
    with_gradient = [layer for layer in data.detail
                     if any(layer in set(frame["layer"].astype(str)) for frame in data.input_gradients)]
    gradient_pages = paged(with_gradient, ROWS_PER_PAGE) if with_gradient else []
    if gradient_pages:
        flags = (" Flagged: " + "; ".join(data.gradient_flags) + ".") if data.gradient_flags else (
            " No layer's gradient scale stands 100× from the median layer's or from its own start.")
        for k, page in enumerate(gradient_pages, start=1):
            sections.append(Section(
                _numbered("input-gradients", k), _titled("Input gradients", k, len(gradient_pages)),
                "The same percentiles of the gradient of the loss with respect to each layer's input, ∂L/∂x "
                f"(recorded with attach(..., gradients=True), {what}): where vanishing or exploding gradients "
                "show first. Detail layers whose input has no gradient (the data itself) are left out." + flags + log,
                partial(figures.percentiles_figure, data.input_gradients, labels, page, max_points=max_points,
                        what=what, xlim=xlim, quantity="input gradient"),
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


def shared_step_axis(data: ReportData) -> StepAxis:
    """The step axis every figure shares: the steps of all runs' drift, records, curves and gradient ICS."""
    frames = [*data.drifts, *data.percentiles, *data.curves, *(g for g in data.gradients if g is not None)]
    steps = [frame["step"].to_numpy(dtype=float) for frame in frames if len(frame)]
    return choose_step_axis(np.concatenate(steps) if steps else np.zeros(1), data.log_schedule)
