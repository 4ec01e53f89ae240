"""Layer-by-layer drift of the plain and the BatchNorm run, and the verdict computed from it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import covshift
from covshift.drift import drift_table
from covshift.verdict import compare as compare_layers

#: The measures of the table: (metric, reference, label).
MEASURES: tuple[tuple[str, str, str], ...] = (
    ("wasserstein", "initial", "W1 (× σ_ref) vs the initial step"),
    ("wasserstein", "previous", "W1 (× σ_ref) step to step"),
    ("mean_shift", "initial", "mean shift (× σ_ref) vs the initial step"),
    ("std_ratio", "initial", "std ratio |log σ/σ_ref| vs the initial step"),
)
#: Records the table is computed from.
SOURCE = "train"


def compare(plain: covshift.Run, batchnorm: covshift.Run, source: str = SOURCE) -> dict:
    """Per-layer drift of both runs for each measure of :data:`MEASURES`, and the verdict.

    Layers are matched by name (the BatchNorm layers of the BN network have no
    partner and are left out). Each value is the layer's drift (mean over its
    channels) averaged over the recorded steps; ``ratio`` is BN / no BN; the
    noise floors come from the halves of each run's probe batch. The first layer
    reads the input data itself, the same in both networks; the verdict is over
    the others (the hidden layers).

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
        measures.append({"metric": metric, "reference": reference, "label": label,
                         "rows": [{k: _json_number(v) for k, v in row.items()} for row in rows]})
    input_layer = measures[0]["rows"][0]["layer"]
    return {"source": source, "input_layer": input_layer, "measures": measures, "verdict": verdict(measures)}


def verdict(measures: list[dict]) -> str:
    """One sentence on W1 (× σ_ref) vs the initial step over the hidden layers, from the numbers.

    The factor is the mean drift over hidden layers without BN divided by the
    same mean with BN. Above 1 BatchNorm reduced drift; otherwise the sentence says it did not.

    >>> rows = [{"layer": "in", "plain": 1.0, "batchnorm": 1.0}, {"layer": "h1", "plain": 2.0, "batchnorm": 0.5},
    ...         {"layer": "h2", "plain": 4.0, "batchnorm": 2.5}]
    >>> verdict([{"metric": "wasserstein", "reference": "initial", "rows": rows}])
    'BatchNorm reduced mean W1 (× σ_ref) drift (vs the initial step) by 2.0× (2 of 2 hidden layers lower; per-layer BN/no-BN ratios 0.25–0.62). Input layer in, which reads the data itself: BN/no-BN 1.00.'
    """
    main = next(m for m in measures if m["metric"] == "wasserstein" and m["reference"] == "initial")
    rows = main["rows"]
    v = compare_layers(
        [row["layer"] for row in rows], [row["plain"] for row in rows], [row["batchnorm"] for row in rows], "no BN", "BN"
    )
    counted = f"{v.lower} of {len(v.hidden)} hidden layers lower; per-layer BN/no-BN ratios {v.ratio_min:.2f}–{v.ratio_max:.2f}"
    if v.factor > 1:
        sentence = f"BatchNorm reduced mean W1 (× σ_ref) drift (vs the initial step) by {v.factor:.1f}× ({counted})."
    else:
        sentence = (
            "BatchNorm did not reduce mean W1 (× σ_ref) drift (vs the initial step): with BN it was "
            f"{1 / v.factor:.1f}× the drift without ({counted})."
        )
    return f"{sentence} Input layer {v.input_layer}, which reads the data itself: BN/no-BN {v.input_ratio:.2f}."


def to_markdown(comparison: dict) -> str:
    """The drift tables (one per measure) and the verdict as Markdown."""
    if comparison["verdict"] is None:
        return f"Drift not measured: {comparison['reason']}."
    lines = [
        f"**Verdict:** {comparison['verdict']}",
        "",
        f"Drift of each convolution's input on the {comparison['source']} batches, mean over channels, "
        "averaged over all recorded steps; `BN/no BN` below 1 means less drift with BatchNorm. The noise "
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
