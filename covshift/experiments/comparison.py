"""Layer-by-layer drift of the plain and the BatchNorm run, and the verdict computed from it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import covshift
from covshift.metrics.api import drift_table
from covshift.metrics.verdict import compare as compare_layers

#: The measures of the table: (metric, reference, label).
MEASURES: tuple[tuple[str, str, str], ...] = (
    ("wasserstein", "initial", "W1 (× σ_ref) vs the initial step"),
    ("wasserstein", "previous", "W1 (× σ_ref) step to step"),
    ("mean_shift", "initial", "mean shift (× σ_ref) vs the initial step"),
    ("std_ratio", "initial", "std ratio |log σ/σ_ref| vs the initial step"),
)
#: Records the table is computed from.
SOURCE = "train"
#: The measure the verdict states: W1 (× σ_ref) against the initial step.
VERDICT_MEASURE = ("wasserstein", "initial")


def compare(plain: covshift.Run, batchnorm: covshift.Run, source: str = SOURCE) -> dict:
    """Per-layer drift of both runs for each measure of :data:`MEASURES`, and the verdict.

    Layers are matched by name (the BatchNorm layers of the BN network have no
    partner and are left out). Each value is the layer's drift (mean over its
    channels) averaged over the recorded steps; ``ratio`` is BN / no BN; the
    noise floors come from the halves of each run's probe batch. The rows of
    :data:`VERDICT_MEASURE` also hold ``plain_median`` and ``batchnorm_median``:
    the same with channels aggregated by their median. The first layer reads
    the input data itself, the same in both networks; the verdict is over the
    others (the hidden layers), by the channel mean and by the channel median.

    Args:
        plain: the run without BatchNorm.
        batchnorm: the run with BatchNorm.
        source: ``"train"`` (training batches) or ``"probe"`` (the fixed probe batch).

    Returns:
        ``{"source", "input_layer", "measures": [{"metric", "reference", "label",
        "rows": [...]}], "verdict"}``, JSON-ready; or ``{"source", "verdict": None,
        "reason"}`` when a run recorded fewer than two steps (no drift to measure).
    """
    steps = min(run.stats(source)["step"].nunique() for run in (plain, batchnorm))
    if steps < 2:
        reason = f"a run recorded {steps} {source} step(s); drift needs at least 2 (train longer or lower --every)"
        return {"source": source, "verdict": None, "reason": reason}
    measures = []
    for metric, reference, label in MEASURES:
        table = drift_table(plain, batchnorm, metric=metric, reference=reference, source=source)
        rows = [
            {
                "layer": row.layer_a,
                "plain": row.mean_a,
                "batchnorm": row.mean_b,
                "ratio": row.mean_ratio,
                "final_plain": row.final_a,
                "final_batchnorm": row.final_b,
                "noise_plain": row.noise_a,
                "noise_batchnorm": row.noise_b,
            }
            for row in table.itertuples()
        ]
        if (metric, reference) == VERDICT_MEASURE:
            median = drift_table(plain, batchnorm, metric=metric, reference=reference, source=source, agg="median")
            for row, by_median in zip(rows, median.itertuples()):
                row.update(plain_median=by_median.mean_a, batchnorm_median=by_median.mean_b)
        measures.append({"metric": metric, "reference": reference, "label": label,
                         "rows": [{k: _json_number(v) for k, v in row.items()} for row in rows]})
    input_layer = measures[0]["rows"][0]["layer"]
    return {"source": source, "input_layer": input_layer, "measures": measures, "verdict": verdict(measures)}


def verdict(measures: list[dict]) -> str:
    """The verdict on W1 (× σ_ref) vs the initial step over the hidden layers, from the numbers.

    :func:`covshift.verdict.compare` over the rows of :data:`VERDICT_MEASURE`: the
    factor is the mean drift over hidden layers without BN divided by the same mean
    with BN, by the channel mean and, when the rows hold it, by the channel median
    (one outlying channel can dominate the mean, not the median).

    >>> rows = [{"layer": "in", "plain": 1.0, "batchnorm": 1.0, "plain_median": 1.0, "batchnorm_median": 1.0},
    ...         {"layer": "h1", "plain": 2.0, "batchnorm": 0.5, "plain_median": 1.0, "batchnorm_median": 0.5},
    ...         {"layer": "h2", "plain": 4.0, "batchnorm": 2.5, "plain_median": 2.0, "batchnorm_median": 1.0}]
    >>> print(verdict([{"metric": "wasserstein", "reference": "initial", "rows": rows}]))
    Mean W1 (× σ_ref) vs the initial step, hidden layers: BN drifts 2.0× less than no BN by the channel mean (2 of 2 hidden layers lower), 2.0× less by the channel median (2 of 2 lower). Per-layer BN/no BN ratios 0.25–0.62. Input layer in, which reads the data itself: BN/no BN 1.00.
    """
    main = next(m for m in measures if (m["metric"], m["reference"]) == VERDICT_MEASURE)
    rows = main["rows"]
    medians = {}
    if all("plain_median" in row for row in rows):
        medians = {"baseline_median": [row["plain_median"] for row in rows],
                   "other_median": [row["batchnorm_median"] for row in rows]}
    v = compare_layers([row["layer"] for row in rows], [row["plain"] for row in rows],
                       [row["batchnorm"] for row in rows], "no BN", "BN", **medians)
    return f"Mean W1 (× σ_ref) vs the initial step, hidden layers: {v.headline}. {v.details}"


def to_markdown(comparison: dict) -> str:
    """The drift tables (one per measure) and the verdict as Markdown."""
    if comparison["verdict"] is None:
        return f"Drift not measured: {comparison['reason']}."
    lines = [
        f"**Verdict:** {comparison['verdict']}",
        "",
        f"Drift of each convolution's input on the {comparison['source']} batches, mean over channels, "
        "averaged over all recorded steps (the verdict also states the median over channels, which one "
        "outlying channel cannot dominate); `BN/no BN` below 1 means less drift with BatchNorm. The noise "
        "floor is the same metric between the two halves of the fixed probe batch (pure sampling noise), "
        f"mean over probe steps. `{comparison['input_layer']}` reads the images, the same in both networks.",
    ]
    for measure in comparison["measures"]:
        lines += [
            "",
            f"### {measure['label']}",
            "",
            "| layer | no BN | BN | BN/no BN | no BN final | BN final | noise floor no BN | noise floor BN |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in measure["rows"]:
            cells = [row[k] for k in ("plain", "batchnorm", "ratio", "final_plain", "final_batchnorm",
                                      "noise_plain", "noise_batchnorm")]
            lines.append(f"| {row['layer']} | " + " | ".join(_fmt(v) for v in cells) + " |")
    return "\n".join(lines)


def write_report(runs: list[covshift.Run], out_dir: Path, notice: str | None = None) -> Path:
    """Write the covshift drift report of ``runs``; put the data ``notice`` (if any) at the top of the page."""
    return covshift.report(runs, out_dir, notice=notice)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:#.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _json_number(value: object) -> object:
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value
