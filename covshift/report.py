"""`report()`: the drift report of one or more runs, as PNG figures and one self-contained HTML page."""

from __future__ import annotations

import fnmatch
import hashlib
import html
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from pandas.core.groupby import SeriesGroupBy

from covshift import figures
from covshift.drift import METRICS, drift, has_probe, noise_floor
from covshift.page import render_html, short_run_note, without_short_runs
from covshift.run import Run, load

#: Metrics drawn by default: normalized W1, mean shift and the std ratio.
DEFAULT_METRICS = ("wasserstein", "mean_shift", "std_ratio")
#: Metrics per drift figure (columns); more metrics go to further figures, so text stays readable.
METRICS_PER_FIGURE = 3
REPORT_FILE = "report.html"
#: Lists the files a report wrote into its directory; a later report removes only those (if unchanged).
MANIFEST_FILE = ".covshift-report.json"


class ReportPage(type(Path())):  # type: ignore[misc]  # Path's concrete class: subclassable on Python 3.11
    """The path of a written ``report.html``; in a notebook it shows the page itself."""

    def _repr_html_(self) -> str:
        page = html.escape(self.read_text(encoding="utf-8"), quote=True)
        return f'<iframe srcdoc="{page}" style="width:100%;height:900px;border:0" title="covshift report"></iframe>'


@dataclass
class Section:
    """One figure of the report: its file, heading and how to read it."""

    name: str
    title: str
    caption: str
    figure: Figure = field(repr=False)

    @property
    def file(self) -> str:
        return f"{self.name}.png"


def report(
    runs: Run | str | Path | Sequence[Run | str | Path],
    out_dir: str | Path,
    *,
    metrics: str | Sequence[str] = DEFAULT_METRICS,
    layers: str | Sequence[str] | None = None,
    reference: str | int = "initial",
    source: str = "train",
    channel: int | None = None,
    max_points: int = figures.DEFAULT_MAX_POINTS,
    notice: str | None = None,
) -> ReportPage:
    """Write the drift report of ``runs`` to ``out_dir``: PNG figures and ``report.html``.

    The page leads with the verdict (:mod:`covshift.verdict`: each later run
    against the first, or a one-line summary of one run) and a compact
    per-layer table, then a glossary, the figures and all numbers. Figures (see
    docs/guide.md, "Reading the report"): ``percentiles.png``, ``drift.png``
    (``drift-2.png`` … past :data:`METRICS_PER_FIGURE` metrics), ``heatmap.png``,
    ``channels.png`` and, when the runs logged training curves, ``curves.png``;
    the summary table also goes to ``summary.csv``. A run with fewer than 2
    recorded steps has no drift: a ``UserWarning`` and a note on the page say
    what to change. The HTML embeds every image as a data URI and loads nothing
    from elsewhere: it opens offline.

    Args:
        runs: a run, a run directory, or a list of them (drawn side by side).
        out_dir: directory to write to (created if needed). Files of the same names are overwritten;
            of the other files, only those an earlier report wrote there (listed in
            :data:`MANIFEST_FILE`) and nobody changed since are removed.
        metrics: drift metrics to draw, names as in :func:`covshift.drift`, or ``"all"``.
        layers: layer names or glob patterns to show (default: every layer of any run).
        reference: what drift is measured from (see :func:`covshift.drift`).
        source: records to draw: ``"train"`` batches or the fixed ``"probe"`` batch.
        channel: draw percentiles of this channel instead of the mean over channels
            (layers with fewer channels show an empty panel).
        max_points: most steps drawn per line (the table uses every step).
        notice: a warning shown in a short amber box at the top of the page: its first line as the title, its other lines (banner rules and a repeat of the title dropped) as a list.

    Returns:
        The path of ``report.html`` (a :class:`pathlib.Path`); displayed in a notebook, the page itself.

    Raises:
        ValueError: no runs, an unknown metric, layers that match nothing, a
            source the runs did not record, a ``channel`` that is negative or beyond
            the layers' channels, or ``max_points`` below 2.
        covshift.store.RunFileError: a run directory is missing or unreadable.
    """
    loaded = _load_all(runs)
    metrics = _metric_list(metrics)
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
        raise ValueError(f"max_points must be an int of at least 2, got {max_points!r}")
    if channel is not None and (isinstance(channel, bool) or not isinstance(channel, int) or channel < 0):
        raise ValueError(f"channel must be None or a channel index (an int >= 0), got {channel!r}")
    labels = run_labels(loaded)
    shown = select_layers(loaded, layers)
    if channel is not None:
        widest = max(int(n) for run in loaded for name, n in run.layers[["layer", "channels"]].values if name in shown)
        if channel >= widest:
            raise ValueError(f"channel {channel} is out of range: the layers shown have at most {widest} channels")
    data = ReportData.compute(loaded, metrics, reference=reference, source=source, channel=channel)
    short = short_run_note(labels, data.steps, source)
    if short:
        warnings.warn(short, UserWarning, stacklevel=2)
    sections = build_sections(data, labels, shown, metrics, reference=reference, max_points=max_points,
                              channel=channel, source=source)
    table = without_short_runs(summary_table(data.drifts, data.noises, labels, shown, metrics), labels, data.steps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    earlier = _read_manifest(out)
    for section in sections:
        section.figure.savefig(out / section.file, dpi=figures.DPI)
    table.to_csv(out / "summary.csv", index=False)
    page = render_html(loaded, labels, sections, table, out, metrics=metrics, steps=data.steps,
                       reference=reference, source=source, notice=notice)
    (out / REPORT_FILE).write_text(page, encoding="utf-8")
    written = [section.file for section in sections] + ["summary.csv", REPORT_FILE]
    _remove_stale(out, earlier, keep=set(written))
    _write_manifest(out, written)
    return ReportPage(out / REPORT_FILE)


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


@dataclass
class ReportData:
    """Everything the figures and the table need, computed once from the runs."""

    percentiles: list[pd.DataFrame]
    drifts: list[pd.DataFrame]
    noises: list[pd.DataFrame | None]
    channel_drifts: list[pd.DataFrame]
    curves: list[pd.DataFrame]
    steps: list[int] = field(default_factory=list)  # recorded steps of each run (of the drawn source)

    @property
    def xlim(self) -> tuple[float, float]:
        """The step range every figure shares: the recorded steps and logged curves of all runs."""
        steps = [frame["step"] for frame in (*self.percentiles, *self.curves) if len(frame)]
        values = pd.concat(steps).to_numpy(dtype=float)
        return float(values.min()), float(values.max())

    @classmethod
    def compute(
        cls, runs: Sequence[Run], metrics: Sequence[str], *, reference: str | int, source: str, channel: int | None
    ) -> ReportData:
        data = cls([], [], [], [], [], [])
        for run in runs:
            stats = run.stats(source=source)
            if stats.empty:
                raise ValueError(f"run {run.name!r} ({run.directory}) has no records of source={source!r}")
            data.steps.append(int(stats["step"].nunique()))
            data.percentiles.append(figures.layer_percentiles(stats, channel))
            channels = drift(run, metric=list(metrics), reference=reference, by="channel", source=source)
            data.channel_drifts.append(channels)
            # The layer means of the same values (NaN, excluded channels, skipped), not a second drift() pass.
            by_layer = channels.groupby(["metric", "step", "layer", "reference"], observed=True, sort=False)
            data.drifts.append(by_layer["value"].mean().reset_index())
            data.noises.append(noise_floor(run, metric=list(metrics)) if has_probe(run) else None)
            data.curves.append(run.curves())
        return data


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

    The drift figure holds at most :data:`METRICS_PER_FIGURE` metrics (more go
    to ``drift-2``, ``drift-3`` …); without 2 recorded steps in any run there is
    no drift, and no drift figure.
    """
    what = "mean over channels" if channel is None else f"channel {channel}"
    xlim = data.xlim
    sections = [
        Section(
            "percentiles",
            "Percentile trajectories",
            f"The 15th (dotted), 50th (solid) and 85th (dashed) percentiles of each layer's input over training "
            f"({what}, {source} batches), with the 1st–99th percentile band faint: the view of Figure 1 in the "
            "BatchNorm paper. Flat, steady bands mean a stable input distribution; bands that climb, widen or "
            "narrow are covariate shift. Runs are side by side, with the same y axis along each row.",
            figures.percentiles_figure(data.percentiles, labels, layers, max_points=max_points, what=what,
                                       xlim=xlim),
        ),
    ]
    if max(data.steps) >= 2:
        chunks = [metrics[i:i + METRICS_PER_FIGURE] for i in range(0, len(metrics), METRICS_PER_FIGURE)]
        for k, chunk in enumerate(chunks, start=1):
            sections.append(Section(
                "drift" if k == 1 else f"drift-{k}",
                "Drift over training" + (f" ({k} of {len(chunks)})" if len(chunks) > 1 else ""),
                "Each layer's drift (mean over its channels) from the reference, one row per layer and one column "
                "per metric; runs overlaid in their colours, each panel on its own y scale. The dashed line in the "
                "same colour is the noise floor. Drift well above its floor is real change of the input "
                "distribution. Where two runs' lines coincide (e.g. the input layer, which reads the same data), "
                "the panel says so and the line underneath is drawn wide.",
                figures.drift_figure(data.drifts, data.noises, labels, layers, chunk, reference=reference,
                                     max_points=max_points, xlim=xlim),
            ))
        sections += [
            Section(
                "heatmap",
                "Layer × step heatmap",
                "Drift of every layer at every drawn step, one panel per run, with one colour scale per metric "
                "shared by all runs: the same colour is the same amount of drift in every panel. Grey rows are "
                "layers the run does not have; the hatched column is the reference step itself (0 by definition, "
                "so not a measurement of low drift).",
                figures.heatmap_figure(data.drifts, labels, layers, metrics, reference=reference,
                                       max_points=max_points, xlim=xlim),
            ),
            Section(
                "channels",
                "Per-channel drift at the end of training",
                "The drift of every channel of each layer at the run's last recorded step: a box for the quartiles "
                "(line: median) and a dot per channel. A tall box or stray dots mean a few channels moved much "
                "more than the rest, which the layer mean hides.",
                figures.channels_figure(data.channel_drifts, labels, layers, metrics),
            ),
        ]
    if any(not frame.empty for frame in data.curves):
        sections.append(
            Section(
                "curves",
                "Training curves",
                "Loss and accuracy the runs logged with run.log(): train solid, test dashed, on the same step axis "
                "as the figures above.",
                figures.curves_figure(data.curves, labels, xlim=xlim),
            )
        )
    return sections


def summary_table(
    drifts: Sequence[pd.DataFrame],
    noises: Sequence[pd.DataFrame | None],
    labels: Sequence[str],
    layers: Sequence[str],
    metrics: Sequence[str],
) -> pd.DataFrame:
    """Per (metric, layer): each run's mean drift over all its steps, its drift at its last step, its noise floor.

    ``{run} noise`` is the run's noise floor averaged over its probe steps (NaN
    without a probe). With several runs, ``{run}/{first} mean`` and ``… final``
    give each later run's value divided by the first run's (below 1: it drifts less).
    """
    columns: dict[str, pd.Series] = {}
    for frame, noise, label in zip(drifts, noises, labels):
        grouped = _by_metric_layer(frame.sort_values("step"))
        columns[f"{label} mean"], columns[f"{label} final"] = grouped.mean(), grouped.last()
        columns[f"{label} noise"] = _by_metric_layer(noise).mean() if noise is not None else pd.Series(dtype=float)
    index = pd.MultiIndex.from_product([list(metrics), list(layers)], names=["metric", "layer"])
    table = pd.DataFrame({name: column.reindex(index) for name, column in columns.items()}, index=index)
    first = labels[0]
    for label in labels[1:]:
        for kind in ("mean", "final"):
            table[f"{label}/{first} {kind}"] = table[f"{label} {kind}"] / table[f"{first} {kind}"]
    return table.dropna(how="all").reset_index()


def _by_metric_layer(frame: pd.DataFrame) -> SeriesGroupBy:
    return frame.groupby([frame["metric"], frame["layer"].astype(str)])["value"]


def _metric_list(metrics: str | Sequence[str]) -> list[str]:
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    if names == ["all"]:  # "all", or ["all"] from the command line
        return list(METRICS)
    if not names:
        raise ValueError("metrics must name at least one drift metric, got an empty list")
    return names


def _load_all(runs: Run | str | Path | Sequence[Run | str | Path]) -> list[Run]:
    if isinstance(runs, (Run, str, Path)):
        runs = [runs]
    loaded = [run if isinstance(run, Run) else load(run) for run in runs]
    if not loaded:
        raise ValueError("report() needs at least one run, got none")
    return loaded


def _read_manifest(out: Path) -> dict[str, str]:
    """``{file name: sha256}`` of the files an earlier report wrote into ``out`` (empty if none or unreadable)."""
    try:
        files = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}


def _remove_stale(out: Path, earlier: dict[str, str], keep: set[str]) -> None:
    """Delete the files an earlier report wrote and this one did not, if still exactly as it wrote them."""
    for name, digest in earlier.items():
        path = out / name
        if name in keep or Path(name).name != name or not path.is_file():
            continue
        if _sha256(path) == digest:  # a file changed or replaced since is not covshift's any more
            path.unlink()


def _write_manifest(out: Path, names: Sequence[str]) -> None:
    files = {name: _sha256(out / name) for name in names}
    (out / MANIFEST_FILE).write_text(json.dumps({"written_by": "covshift.report", "files": files}, indent=1),
                                     encoding="utf-8")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
