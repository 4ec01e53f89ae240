"""The drift scalars the callbacks log: the newest recorded step's drift, per layer and averaged."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import covshift
from covshift import schedule
from covshift.faults import CovshiftWarning
from covshift.metrics.engine import parse_reference
from covshift.metrics.registry import resolve

PREFIX = "covshift"
#: Name of the scalar averaging a metric over every recorded layer.
LAYER_MEAN = "layer_mean"


def scalar_name(metric: str, layer: str) -> str:
    """``covshift/<metric>/<layer>``: one chart per layer and metric, grouped under ``covshift``."""
    return f"{PREFIX}/{metric}/{layer}"


def metric_names(metric: str | Sequence[str]) -> tuple[str, ...]:
    """The registered metrics ``metric`` names (one, a list, or ``"all"``); ValueError for an unknown one."""
    if not isinstance(metric, str) and not len(metric):
        raise ValueError("metric must name at least one drift metric")
    return tuple(chosen.name for chosen in resolve(metric))


def check_attach_options(attach_options: dict[str, Any], trainer: str) -> None:
    """Refuse a callback's ``attach_options`` naming ``optimizer`` or ``step`` (the ``trainer``'s optimizer
    steps), and a bad ``every`` when the callback is made rather than when training starts."""
    if "optimizer" in attach_options or "step" in attach_options:
        raise TypeError(f"CovshiftCallback steps on the {trainer}'s optimizer: do not pass optimizer= or step=")
    if "every" in attach_options:
        schedule.parse(attach_options["every"])


#: Logged with the drift: the covshift step whose drift the scalars are (the newest recorded one).
STEP_SCALAR = "covshift/step"
#: Logged with the drift when the run has alerts: how many so far.
ALERTS_SCALAR = "covshift/alerts"


class DriftScalars:
    """Drift of the newest recorded training step as flat ``{name: value}`` scalars, each step once.

    Only the steps the reference needs are passed to :func:`covshift.drift` (the
    layer's first step for ``"initial"``, the step before for ``"previous"``), so a
    logging call costs one step's drift, not the whole run's. Reading the
    records (``run.stats``) flushes the buffered steps to the run directory, and
    builds the run's frame anew whenever a part was added: that read, not the
    drift, is most of the cost on a long run (see the guide).
    A failure is reported once as a :class:`~covshift.faults.CovshiftWarning` and
    logging stops; training never sees it.
    """

    def __init__(
        self, metric: str | Sequence[str] = "wasserstein", reference: str | int = "initial", per_layer: bool = True
    ) -> None:
        self.metrics = metric_names(metric)
        self.per_layer = per_layer
        self.reference = reference
        self.last_step: int | None = None  # newest step already turned into scalars
        self.failed = False

    def newest(self, run: Any) -> tuple[int, dict[str, float]] | None:
        """``(step, scalars)`` of the newest recorded training step not yet returned, else None."""
        if self.failed:
            return None
        try:
            return self._newest(run)
        except Exception as err:  # noqa: BLE001 - logging drift must never stop training
            self.failed = True
            warnings.warn(
                f"covshift could not compute drift for logging ({type(err).__name__}: {err}); "
                "drift scalars are no longer logged, the run is still recorded",
                CovshiftWarning,
                stacklevel=2,
            )
            return None

    def _newest(self, run: Any) -> tuple[int, dict[str, float]] | None:
        stats = run.stats("train")
        if stats.empty:
            return None
        step = int(stats["step"].max())
        if step == self.last_step:
            return None
        self.last_step = step
        steps = self._needed_steps(stats, step)
        table = covshift.drift(stats[stats["step"].isin(steps)], metric=list(self.metrics), reference=self.reference)
        rows = table[table["step"] == step]
        scalars: dict[str, float] = {}
        for metric in self.metrics:
            values = rows[rows["metric"] == metric].dropna(subset=["value"])
            if self.per_layer:
                for layer, value in zip(values["layer"].astype(str), values["value"]):
                    scalars[scalar_name(metric, layer)] = float(value)
            if len(values):
                scalars[scalar_name(metric, LAYER_MEAN)] = float(values["value"].mean())
        alerts = len(run.alerts())
        if alerts:  # attach(..., on_alert=...): how many so far, beside the drift in the framework's logs
            scalars[ALERTS_SCALAR] = float(alerts)
        return step, scalars

    def _needed_steps(self, stats: Any, step: int) -> set[int]:
        """The steps whose records the drift of ``step`` reads, for each layer."""
        steps = {step}
        try:
            label, number = parse_reference(self.reference)
        except ValueError:  # an unknown reference: let drift() explain it
            return steps
        if label.startswith("step:"):
            return steps | {number}
        if label == "initial":
            return steps | {int(s) for s in stats.groupby("layer", observed=True)["step"].min()}
        per_layer = stats[["layer", "step"]].drop_duplicates().groupby("layer", observed=True)["step"]
        keep = 1 if label == "previous" else number
        for _, layer_steps in per_layer:
            earlier = sorted(s for s in layer_steps if s < step)
            steps.update(int(s) for s in earlier[-keep:])
        return steps


def unique_directory(base: Any) -> Any:
    """``base``, or ``base_1``, ``base_2`` … when a directory of that name already exists."""
    from pathlib import Path

    base = Path(base)
    candidate, n = base, 0
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}_{n}")
    return candidate
