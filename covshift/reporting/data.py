"""The report's numbers, computed once from the runs and before anything is drawn (:class:`ReportData`).

Layer drift of every layer comes from :func:`covshift.drift`; per-channel
records are read only for the few layers that get detail figures, one layer at
a time. Nothing here draws or writes HTML: figures (:mod:`covshift.reporting.sections`)
and the page (:mod:`covshift.reporting.html`) read what this module computes.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from covshift.defaults import DEFAULT_TOP
from covshift.metrics.api import drift, has_probe, noise_floor
from covshift.reporting.gradients import gradient_view, has_gradients
from covshift.reporting.comparison import comparison_table, match_layers, without_short_runs
from covshift.reporting.verdicts import seed_verdict_lines, short_run_note, verdict_lines, verdict_metric
from covshift.schedule import LogSpaced, from_config
from covshift.science.gradient_ics import GradientICS, gradient_frame
from covshift.science.null_floor import NullFloor
from covshift.store.run import Run

#: The quantiles the report draws: the 15th, 50th and 85th percentiles (the BatchNorm paper's Figure 1)
#: inside the 1st–99th percentile band.
DRAWN_QUANTILES = ("q0.01", "q0.15", "q0.5", "q0.85", "q0.99")


def layers_in_order(runs: Sequence[Run], layers: str | Sequence[str] | None = None) -> list[str]:
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


def run_labels(runs: Sequence[Run]) -> list[str]:
    """Each run's name, made unique with ``#2``, ``#3`` … where names repeat.

    >>> class R: name = "plain"
    >>> run_labels([R(), R()])
    ['plain', 'plain #2']
    """
    labels: list[str] = []
    for run in runs:
        label, k = run.name, 2
        while label in labels:
            label, k = f"{run.name} #{k}", k + 1
        labels.append(label)
    return labels


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
    labels: list[str] = field(default_factory=list)  # each run's label (its name, made unique)
    layers: list[str] = field(default_factory=list)  # every layer of the runs, in model order
    table: pd.DataFrame = field(default_factory=pd.DataFrame)  # comparison_table() of every layer, short runs blanked
    verdicts: list[tuple[str, str]] = field(default_factory=list)  # (headline, details) per verdict line
    short_note: str | None = None  # what to change when a run recorded too few steps
    probes: str = ""  # each run's probe batch, in words
    matches: list[dict[str, str]] = field(default_factory=list)  # per later run: {its layer: the first run's}
    input_gradients: list[pd.DataFrame] = field(default_factory=list)  # detail layers' input-gradient percentiles
    gradient_flags: list[str] = field(default_factory=list)  # layers whose gradient scale vanishes or explodes
    alerts: list[str] = field(default_factory=list)  # the alerts stored in the runs, one sentence each

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
        match: Mapping[str, str] | None = None,
        progress: Any = None,
    ) -> ReportData:
        """Layer-level drift of every layer, the ``top`` layers by drift, and detail of those and of ``asked``.

        ``match`` pairs layers of the later runs with the first run's (:func:`match_layers`);
        ``progress`` is a tqdm bar (or None) advanced once per run and per detail layer of each run.
        """
        metric = verdict_metric(metrics)
        data = cls([], [], [], [], [], [])
        _grow(progress, len(runs))
        for run in runs:
            data._add_overview(run, metrics, metric, reference=reference, source=source)
            _advance(progress, f"drift of {run.name}")
        data.ranked = list(rank_layers(data.drifts, metric).index[:top])
        data.layers = layers = layers_in_order(runs)
        data.detail = detail_layers(layers, data.ranked, asked)
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
                percentiles.append(layer_percentiles(stats, channel))
                if stats["step"].nunique() > 1:
                    channels = drift(stats, metric=list(metrics), reference=reference, by="channel", source=source)
                    last.append(channels[channels["step"] == channels["step"].max()])
            data.percentiles.append(pd.concat(percentiles, ignore_index=True) if percentiles
                                    else _empty(["step", "layer"]))
            data.last_drifts.append(pd.concat(last, ignore_index=True) if last
                                    else _empty(["step", "layer", "channel", "metric", "value"]))
            data.steps.append(len(seen))
        data.labels = run_labels(runs)
        data.matches = [match_layers(runs[0], run, match) for run in runs[1:]]
        data.short_note = short_run_note(data.labels, data.steps, source)
        table = comparison_table(data.drifts, data.noises, data.labels, layers, metrics, data.matches)
        data.table = without_short_runs(table, data.labels, data.steps)
        by_seed = seed_verdict_lines(data.table, [run.name for run in runs], data.labels, data.steps, metric,
                                     data.medians)
        data.verdicts = by_seed or verdict_lines(data.table, data.labels, data.steps, metric, data.medians,
                                                 data.matches)
        data.probes = probe_description(runs, data.labels)
        data.alerts = [f"{label}: step {row.step}, layer {row.layer!r}: {row.kind} — {row.metric} {row.value:.4g}, "
                       f"{row.ratio:.3g}× its floor {row.floor:.4g}"
                       for run, label in zip(runs, data.labels) for row in run.alerts().itertuples()]
        if any(has_gradients(run) for run in runs):
            data.input_gradients, data.gradient_flags = gradient_view(
                runs, data.labels, data.detail, lambda stats: layer_percentiles(stats, channel))
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
        null = run.table(NullFloor.table)
        self.nulls.append(null[null["metric"].isin(metrics)] if null is not None and len(null) else None)
        gradients = run.table(GradientICS.table)
        self.gradients.append(gradient_frame(gradients) if gradients is not None else None)
        self.curves.append(run.curves())
        self.log_schedule = self.log_schedule or isinstance(from_config(run.meta.get("config") or {}), LogSpaced)


def _layer_stats(run: Run, layers: Sequence[str], source: str) -> pd.DataFrame:
    """``run.stats(source)`` rows of ``layers`` only (those ``run`` recorded): the one place the report reads
    per-channel records, and only those row groups are read."""
    recorded = set(run.layers["layer"])
    return run.stats(source, layers=[name for name in layers if name in recorded])


def _empty(columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=float) for name in columns})


def _grow(progress: Any, n: int) -> None:
    if progress is not None:
        progress.total = (progress.total or 0) + n
        progress.refresh()


def _advance(progress: Any, what: str) -> None:
    if progress is not None:
        progress.set_postfix_str(what, refresh=False)
        progress.update(1)


def layer_percentiles(stats: pd.DataFrame, channel: int | None = None) -> pd.DataFrame:
    """Per (step, layer): the drawn quantiles of one channel, or their mean over the layer's channels.

    The mean over channels of each quantile is the quantile function of the
    channels' one-dimensional Wasserstein barycenter: a typical channel, not
    the pooled distribution (which mixes channels of different scales).

    Args:
        stats: :meth:`covshift.Run.stats` rows of one source.
        channel: a channel index, or None for the mean over channels.
    """
    columns = list(DRAWN_QUANTILES)
    if channel is not None:
        stats = stats[stats["channel"] == channel]
    return stats.groupby(["step", "layer"], observed=True)[columns].mean().reset_index()


def probe_description(runs: Sequence[Run], labels: Sequence[str]) -> str:
    """Each run's probe: how many probe steps, how often, how many values per channel; runs alike named together."""
    said: dict[str, list[str]] = {}
    for run, label in zip(runs, labels):
        if "probe_a" not in run.sources().index:
            text = "no probe (no noise floor)"
        else:  # the probe steps, and the half's size from the first probe step's records
            probed = run.stats("probe_a", columns=["count"])
            steps = sorted(probed["step"].unique())
            every = f", one every {int(pd.Series(steps).diff().median())} steps" if len(steps) > 1 else ""
            half = probed[probed["step"] == steps[0]]
            text = f"{len(steps)} probe steps{every}; each half: {_half_size(run, half)}"
        said.setdefault(text, []).append(label)
    return "Here: " + "; ".join(f"{', '.join(names)}: {text}" for text, names in said.items()) + "."


def _half_size(run: Run, records: pd.DataFrame) -> str:
    """How big one probe half is: its examples where a Linear layer on flat input counts them, else its values."""
    counts = records.groupby(records["layer"].astype(str), observed=True)["count"].min()
    flat = run.layers[(run.layers["type"] == "Linear") & (run.layers["channel_dim"] == 1)]["layer"].astype(str)
    examples = counts.reindex(flat).dropna()
    if len(examples):
        return f"{int(examples.iloc[0]):,} examples"
    low, high = int(counts.min()), int(counts.max())
    span = f"{low:,}" if low == high else f"{low:,}–{high:,}"
    return f"{span} values per channel, depending on the layer (examples × positions)"
