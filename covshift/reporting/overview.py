"""What a run holds, as text for the command line: `covshift stats` (:func:`run_overview`,
:func:`layer_overview`) and `covshift watch` (:func:`live_table`).

``live_table`` is read-only and safe while another process writes the run: every
read opens the run afresh (parts are renamed into place whole, so a read sees each
part entirely or not at all) and reads only the first and the newest recorded steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from covshift.metrics.api import drift
from covshift.faults import EMPTY_RUN
from covshift.store.run import Run, load

#: Layers the table shows by default: the most drifting.
WATCH_TOP = 10


def live_table(directory: str, top: int = WATCH_TOP, metric: str = "wasserstein") -> str:
    """A few lines: the run, its newest recorded step, and its ``top`` layers by drift from their first step."""
    run = load(directory)
    sources = run.sources()
    if "train" not in sources.index:
        return f"run {run.name!r} at {run.directory}: no training step recorded yet"
    first, last = int(sources.loc["train", "first step"]), int(sources.loc["train", "last step"])
    lines = [f"run {run.name!r} at {run.directory}: {int(sources.loc['train', 'steps'])} recorded steps, "
             f"newest {last}"]
    alerts = run.alerts()
    counts = alerts.groupby(alerts["layer"].astype(str)).size() if len(alerts) else pd.Series(dtype=int)
    if first == last:
        lines.append("one recorded step so far: no drift yet")
        return "\n".join(lines)
    table = drift(run.stats("train", steps=[first, last]), metric=metric)
    newest = table[table["step"] == last].assign(layer=lambda frame: frame["layer"].astype(str))
    newest = newest.sort_values("value", ascending=False, na_position="last").head(top)
    kinds = dict(zip(run.layers["layer"].astype(str), run.layers["type"]))
    width = max([5, *(len(name) for name in newest["layer"])])
    lines.append(f"{'layer':<{width}}  {'type':<14} {metric + ' now':>16}  alerts")
    for row in newest.itertuples():
        value = "–" if not math.isfinite(row.value) else f"{row.value:.4g}"
        lines.append(f"{row.layer:<{width}}  {kinds.get(row.layer, '?'):<14} {value:>16}  {int(counts.get(row.layer, 0))}")
    if len(alerts):
        latest = alerts.iloc[-1]
        lines.append(f"{len(alerts)} alerts; newest: step {latest['step']}, layer {latest['layer']!r}: {latest['kind']}")
    return "\n".join(lines)


def layer_overview(run: Run, layers: list[str], source: str) -> str:
    """Per layer and step: channels, mean of the channel means and standard deviations, extrema, zero fraction."""
    import numpy as np

    stats = run.stats(source, layers=layers, columns=["mean", "var", "min", "max", "zero_frac"])
    if stats.empty:
        return f"no {source} records of {', '.join(layers)} in {run.directory}"
    stats = stats.assign(sd=np.sqrt(stats["var"]))
    table = stats.groupby(["layer", "step"], observed=True).agg(
        channels=("channel", "size"), mean=("mean", "mean"), sd=("sd", "mean"),
        min=("min", "min"), max=("max", "max"), zero_frac=("zero_frac", "mean"))
    return table.to_string(float_format=lambda v: f"{v:.4g}")


def run_overview(run: Run) -> str:
    """A few lines that say what a run holds: layers, channels, steps per source, curves, size on disk."""
    sources = run.sources()
    files = [p for p in Path(run.directory).iterdir() if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    lines = [
        f"run {run.name!r} at {run.directory}",
        f"model: {run.meta.get('model', '?')}, created {run.meta.get('created', '?')}, "
        f"covshift {run.meta.get('versions', {}).get('covshift', '?')}",
        f"size on disk: {_size(size)} in {len(files)} files",
        "",
    ]
    if sources.empty:
        lines += [EMPTY_RUN, ""]
    else:
        lines += [sources.to_string(), ""]
    layers = run.layers.set_index("layer")
    lines.append(f"{len(layers)} layers, {int(layers['channels'].sum())} channels")
    if len(layers):
        lines.append(layers.to_string())
    curves = run.curves()
    if not curves.empty:
        names = ", ".join(c for c in curves.columns if c != "step")
        lines += ["", f"training curves: {len(curves)} rows ({names})"]
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
