"""`report()`: the drift report of one or more runs, as PNG figures and one self-contained HTML page."""

from __future__ import annotations

import hashlib
import html
import json
import os
import secrets
import stat
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from covshift.defaults import DEFAULT_MAX_POINTS, DEFAULT_METRICS, DEFAULT_TOP, PROGRESS_LAYERS
from covshift.metrics.registry import resolve
from covshift.reporting.panels import DPI
from covshift.reporting.data import ReportData, layers_in_order
from covshift.reporting.html import render_html
from covshift.reporting.sections import build_sections
from covshift.store.files import META_FILE
from covshift.store.run import Run, load
REPORT_FILE = "report.html"
#: Lists the files a report wrote into its directory; a later report removes only those (if unchanged).
MANIFEST_FILE = ".covshift-report.json"


class ReportPage(type(Path())):  # type: ignore[misc]  # Path's concrete class: subclassable on Python 3.11
    """The path of a written ``report.html``; in a notebook it shows the page itself."""

    def _repr_html_(self) -> str:
        page = html.escape(self.read_text(encoding="utf-8"), quote=True)
        return f'<iframe srcdoc="{page}" style="width:100%;height:900px;border:0" title="covshift report"></iframe>'


def report(
    runs: Run | str | Path | Sequence[Run | str | Path],
    out_dir: str | Path,
    *,
    metrics: str | Sequence[str] = DEFAULT_METRICS,
    layers: str | Sequence[str] | None = None,
    top: int = DEFAULT_TOP,
    reference: str | int = "initial",
    source: str = "train",
    channel: int | None = None,
    match: Mapping[str, str] | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    notice: str | None = None,
    progress: bool | None = None,
) -> ReportPage:
    """Write the drift report of ``runs`` to ``out_dir``: PNG figures and ``report.html``.

    The page leads with the verdict (:mod:`covshift.metrics.verdict`: each later run
    against the first, by the channel mean and the channel median, or a
    one-line summary of one run; when several runs share a name they are taken as
    seeds of one network, paired in order with the first name's, and the verdict states
    the factor's median over seeds with its min–max and bootstrap interval,
    :func:`covshift.reporting.verdicts.seed_verdict_lines`) and a table of the ``top`` layers that drift
    most, then a glossary, the figures and all numbers. Figures (see
    docs/guide.md, "Reading the report"): the overview ``heatmap.png`` of every
    layer; for the ``top`` layers and those ``layers`` names, ``percentiles.png``,
    ``drift.png`` and ``channels.png``; ``curves.png`` when the runs logged
    training curves and ``gradient-ics.png`` when they hold gradient ICS. No
    PNG is taller than :data:`covshift.defaults.MAX_HEIGHT_PX`: more layers go to
    ``heatmap-2.png``, ``percentiles-2.png`` … (and more than
    :data:`covshift.reporting.sections.METRICS_PER_FIGURE` metrics to further drift figures).
    The summary table of every layer also goes to ``summary.csv``. A run with
    fewer than 2 recorded steps has no drift: a ``UserWarning`` and a note on
    the page say what to change. The HTML embeds every image as a data URI and
    loads nothing from elsewhere: it opens offline.

    Args:
        runs: a run, a run directory, or a list of them (drawn side by side).
        out_dir: directory to write to (created if needed). Files of the same names are overwritten;
            of the other files, only those an earlier report wrote there (listed in
            :data:`MANIFEST_FILE`) and nobody changed since are removed.
        metrics: drift metrics to draw, names as in :func:`covshift.drift`, or ``"all"``.
        layers: layer names or glob patterns that get detail figures besides the ``top`` ones.
        top: how many of the most drifting layers (by the verdict's metric, the largest
            of the runs) the table lists and get detail figures; 0 for only ``layers``.
        reference: what drift is measured from (see :func:`covshift.drift`).
        source: records to draw: ``"train"`` batches or the fixed ``"probe"`` batch.
        channel: draw percentiles of this channel instead of the mean over channels
            (layers with fewer channels show an empty panel).
        match: layers of the later runs paired with the first run's, ``{later run's layer: first
            run's layer}``, for the verdict and the ratios (the others: same name, type and channel
            count; then the k-th layer of each type and channel count with the k-th; the page names
            every pair whose names differ).
        max_points: most steps drawn per line (the table uses every step).
        notice: a warning shown in a short amber box at the top of the page (its first sentence as the
            title, the others as a list), above the notices stored with the runs (``run.add_notice``).
        progress: show a progress bar on stderr; None: when a run has :data:`PROGRESS_LAYERS` layers or more.

    Returns:
        The path of ``report.html`` (a :class:`pathlib.Path`); displayed in a notebook, the page itself.

    Raises:
        ValueError: no runs, an unknown metric, layers that match nothing, a
            source the runs did not record, a ``channel`` that is negative or beyond
            the layers' channels, ``top`` below 0 or ``max_points`` below 2.
        covshift.store.RunFileError: a run directory is missing or unreadable.
    """
    loaded = _load_all(runs)
    metrics = _metric_list(metrics)
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
        raise ValueError(f"max_points must be an int of at least 2, got {max_points!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"top must be an int of at least 0 (layers with detail figures), got {top!r}")
    if channel is not None and (isinstance(channel, bool) or not isinstance(channel, int) or channel < 0):
        raise ValueError(f"channel must be None or a channel index (an int >= 0), got {channel!r}")
    asked = layers_in_order(loaded, layers) if layers is not None else []
    if channel is not None:
        widest = max(int(n) for run in loaded for n in run.layers["channels"])
        if channel >= widest:
            raise ValueError(f"channel {channel} is out of range: the layers shown have at most {widest} channels")
    if progress is None:
        progress = max(len(run.layers) for run in loaded) >= PROGRESS_LAYERS
    out = Path(out_dir)
    with tqdm(desc="covshift report", unit="part", disable=not progress, leave=False) as bar:
        data = ReportData.compute(loaded, metrics, reference=reference, source=source, channel=channel, top=top,
                                  asked=asked, match=match, progress=bar)
        if data.short_note:
            warnings.warn(data.short_note, UserWarning, stacklevel=2)
        sections = build_sections(data, metrics, reference=reference, max_points=max_points, channel=channel,
                                  source=source)
        out.mkdir(parents=True, exist_ok=True)
        earlier = _read_manifest(out)
        bar.total = (bar.total or 0) + len(sections)
        for section in sections:  # drawn, saved and dropped one at a time
            bar.set_postfix_str(section.file, refresh=False)
            _replace(out / section.file, lambda tmp, figure=section.figure: figure.savefig(tmp, dpi=DPI, format="png"))
            bar.update(1)
    _replace(out / "summary.csv", lambda tmp: data.table.to_csv(tmp, index=False))
    notices = list(dict.fromkeys([*([notice] if notice else []), *(text for run in loaded for text in run.notices())]))
    page = render_html(data, loaded, sections, out, metrics=metrics, reference=reference, source=source,
                       notices=notices)
    _replace(out / REPORT_FILE, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    written = [section.file for section in sections] + ["summary.csv", REPORT_FILE]
    _remove_stale(out, earlier, keep=set(written))
    _write_manifest(out, written)
    return ReportPage(out / REPORT_FILE)


def _metric_list(metrics: str | Sequence[str]) -> list[str]:
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    if not names:
        raise ValueError("metrics must name at least one drift metric, got an empty list")
    return [metric.name for metric in resolve("all" if names == ["all"] else names)]  # ["all"]: the command line


def _load_all(runs: Run | str | Path | Sequence[Run | str | Path]) -> list[Run]:
    """The runs, a directory that holds runs (an experiment's output) standing for the runs inside it."""
    if isinstance(runs, (Run, str, Path)):
        runs = [runs]
    loaded: list[Run] = []
    for run in runs:
        if isinstance(run, Run):
            loaded.append(run)
        elif not (Path(run) / META_FILE).exists() and (inside := runs_inside(Path(run))):
            loaded.extend(inside)
        else:
            loaded.append(load(run))
    if not loaded:
        raise ValueError("report() needs at least one run, got none")
    return loaded


def runs_inside(directory: Path) -> list[Run]:
    """The runs in the folders right inside ``directory``, oldest first (the order they were recorded in)."""
    if not directory.is_dir():
        return []
    found = [load(path) for path in sorted(directory.iterdir()) if (path / META_FILE).is_file()]
    # "created" has whole seconds: runs recorded one after the other within a second are told apart by
    # when their meta.json was last written (at their end)
    return sorted(found, key=lambda run: (str(run.meta.get("created", "")),
                                          (Path(run.directory) / META_FILE).stat().st_mtime_ns))
def _replace(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` through ``write(temporary path)`` and rename it into place: a link (or anything else)
    of that name is replaced, never written through, and a failed write leaves no file behind."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _regular(path: Path) -> bool:
    """Whether ``path`` itself (not a link's target) is a regular file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_manifest(out: Path) -> dict[str, str]:
    """``{file name: sha256}`` of the files an earlier report wrote into ``out`` (empty if none or unreadable)."""
    if not _regular(out / MANIFEST_FILE):  # a link, a FIFO: not one a report wrote
        return {}
    try:
        files = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}


def _remove_stale(out: Path, earlier: dict[str, str], keep: set[str]) -> None:
    """Delete the files an earlier report wrote and this one did not, if still exactly as it wrote them."""
    for name, digest in earlier.items():
        path = out / name
        if name in keep or Path(name).name != name or not _regular(path):
            continue
        if _sha256(path) == digest:  # a file changed or replaced since is not covshift's any more
            path.unlink()


def _write_manifest(out: Path, names: Sequence[str]) -> None:
    files = {name: _sha256(out / name) for name in names}
    text = json.dumps({"written_by": "covshift.report", "files": files}, indent=1)
    _replace(out / MANIFEST_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
