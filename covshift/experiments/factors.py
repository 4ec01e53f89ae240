"""How much less (or more) one network drifts than another, by several measures, and its gradient ICS beside.

One number per measure and pair of networks, from the stored runs, so that a
factor can be stated with the measure it depends on. A measure is a drift metric,
its reference and whether it is divided by the reference's standard deviation
(:data:`MEASURES`): the σ-normalized W1 against step 0 is large for a network whose
starting σ is tiny, while raw W1 and KS do not depend on that scale, and a later
reference or the previous step asks how much the distribution still moves.

Each factor is ``baseline / other`` of the mean over hidden layers (every recorded
layer but the first, which reads the data) of each layer's drift averaged over the
recorded steps, channels aggregated by their mean and by their median
(:func:`covshift.metrics.verdict.compare`): above 1, ``other`` drifts less.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

import covshift
from covshift.metrics.verdict import compare
from covshift.reporting.gradients import gradient_scale, has_gradients
from covshift.science.gradient_ics import GradientICS, gradient_frame


@dataclass(frozen=True)
class Measure:
    """A drift measure: ``metric`` against ``reference``, divided by σ_ref when ``normalize``."""

    key: str
    metric: str
    reference: str  # "initial", "previous" or "later" (the recorded step at a fifth of training)
    normalize: bool
    label: str


MEASURES: tuple[Measure, ...] = (
    Measure("w1_sigma", "wasserstein", "initial", True, "W1 (× σ_ref) vs step 0"),
    Measure("w1_raw", "wasserstein", "initial", False, "raw W1 vs step 0"),
    Measure("ks", "ks", "initial", True, "KS vs step 0"),
    Measure("w1_sigma_later", "wasserstein", "later", True, "W1 (× σ_ref) vs the step at 1/5 of training"),
    Measure("w1_raw_later", "wasserstein", "later", False, "raw W1 vs the step at 1/5 of training"),
    Measure("w1_sigma_previous", "wasserstein", "previous", True, "W1 (× σ_ref) step to step"),
    Measure("w1_raw_previous", "wasserstein", "previous", False, "raw W1 step to step"),
)
AGGREGATES = ("mean", "median")


def later_step(run: covshift.Run, fraction: float = 0.2, source: str = "train") -> int:
    """The first recorded step at or after ``fraction`` of the run's last recorded step: the "later" reference."""
    steps = sorted(run.stats(source, columns=["step"])["step"].unique())
    target = steps[-1] * fraction
    return int(next(s for s in steps if s >= target))


def layer_drift(run: covshift.Run, measure: Measure, agg: str, later: int, source: str = "train") -> pd.Series:
    """Each layer's drift by ``measure`` (channels aggregated by ``agg``), averaged over recorded steps."""
    reference: str | int = later if measure.reference == "later" else measure.reference
    frame = covshift.drift(run, metric=measure.metric, reference=reference, normalize=measure.normalize, agg=agg,
                           source=source)
    if measure.reference == "later":
        frame = frame[frame["step"] != later]  # zero by construction
    values = frame.groupby(frame["layer"].astype(str), sort=False)["value"].mean()
    order = [str(layer) for layer in run.layers["layer"]]
    return values.reindex([layer for layer in order if layer in values.index])


def drift_values(run: covshift.Run, source: str = "train") -> dict[str, dict[str, dict[str, float]]]:
    """``{measure key: {agg: {layer: drift}}}`` of one run, for every measure of :data:`MEASURES`."""
    later = later_step(run, source=source)
    return {m.key: {agg: {k: float(v) for k, v in layer_drift(run, m, agg, later, source).items()}
                    for agg in AGGREGATES}
            for m in MEASURES}


def factors(base: dict, other: dict, base_name: str, other_name: str) -> dict[str, dict[str, float]]:
    """Per measure: ``{"mean": factor, "median": factor, "lower": hidden layers lower by the mean, "layers": n}``.

    ``base`` and ``other`` are :func:`drift_values` of two runs; layers are paired by name, the first
    (the data) left out.

    >>> a = {m.key: {g: {"in": 1.0, "h": 4.0} for g in AGGREGATES} for m in MEASURES}
    >>> b = {m.key: {g: {"in": 1.0, "h": 2.0} for g in AGGREGATES} for m in MEASURES}
    >>> factors(a, b, "plain", "bn")["ks"]
    {'mean': 2.0, 'median': 2.0, 'lower': 1, 'layers': 1}
    """
    result = {}
    for measure in MEASURES:
        by_agg = {}
        for agg in AGGREGATES:
            mine, theirs = base[measure.key][agg], other[measure.key][agg]
            layers = [layer for layer in mine if layer in theirs]
            if len(layers) < 2:  # too few recorded steps for this measure: no drift
                by_agg[agg] = (math.nan, 0, 0)
                continue
            v = compare(layers, [mine[k] for k in layers], [theirs[k] for k in layers], base_name, other_name)
            by_agg[agg] = (v.factor, v.lower, len(v.hidden))
        result[measure.key] = {"mean": _number(by_agg["mean"][0]), "median": _number(by_agg["median"][0]),
                               "lower": by_agg["mean"][1], "layers": by_agg["mean"][2]}
    return result


def gradient_ics(run: covshift.Run) -> dict[str, dict[str, float]]:
    """Per measured layer but the first (whose ICS is 0 by definition): mean ``grad_norm``, ``ics_norm``
    (raw ‖G − G'‖), ``relative`` (‖G − G'‖/‖G‖) and ``cosine`` over the measured steps; ``{}`` when none."""
    table = run.table(GradientICS.table)
    if table is None or not len(table):
        return {}
    frame = gradient_frame(table)
    first = frame["layer"].cat.categories[0]
    frame = frame[frame["layer"] != first]
    return {str(layer): {col: float(rows[col].mean()) for col in ("grad_norm", "ics_norm", "relative", "cosine")}
            for layer, rows in frame.groupby("layer", observed=True)}


def input_gradients(run: covshift.Run) -> dict[str, float] | None:
    """The scale of ∂loss/∂(layer input) (``attach(..., gradients=True)``) across layers and over training.

    Each layer's scale at a recorded step is the mean over channels of the input gradient's standard
    deviation (:func:`covshift.reporting.gradients.gradient_scale`). ``spread`` is the median over
    steps of the largest layer's scale / the smallest's; ``change`` the median over layers of the
    last recorded step's scale / the first's; ``first``, ``last`` the median layer's scale at those
    steps. None when the run holds no input gradients.
    """
    if not has_gradients(run):
        return None
    scale = gradient_scale(run).dropna(axis=1, how="all")
    if scale.empty:
        return None
    spread = (scale.max(axis=1) / scale.min(axis=1)).median()
    change = (scale.iloc[-1] / scale.iloc[0]).median()
    return {"spread": float(spread), "change": float(change), "first": float(scale.iloc[0].median()),
            "last": float(scale.iloc[-1].median()), "layers": int(scale.shape[1]), "steps": int(scale.shape[0])}


def ics_ratios(base: dict, other: dict) -> dict[str, float]:
    """``other`` / ``base`` of the layer-mean gradient ICS, relative and raw; each one's mean cosine;
    how many layers are lower in ``other`` (relative and raw). NaN where no layer is shared.

    >>> g = lambda r, n, c: {"h": {"grad_norm": 1.0, "ics_norm": n, "relative": r, "cosine": c}}
    >>> ics_ratios(g(0.2, 0.1, 0.9), g(0.4, 0.05, 0.8))["relative"]
    2.0
    """
    layers = [layer for layer in base if layer in other]
    if not layers:
        return {"relative": math.nan, "raw": math.nan, "cosine_base": math.nan, "cosine_other": math.nan,
                "lower_relative": 0, "lower_raw": 0, "layers": 0}

    def mean(table: dict, column: str) -> float:
        return sum(table[layer][column] for layer in layers) / len(layers)

    return {
        "relative": _ratio(mean(other, "relative"), mean(base, "relative")),
        "raw": _ratio(mean(other, "ics_norm"), mean(base, "ics_norm")),
        "cosine_base": mean(base, "cosine"),
        "cosine_other": mean(other, "cosine"),
        "lower_relative": sum(other[k]["relative"] < base[k]["relative"] for k in layers),
        "lower_raw": sum(other[k]["ics_norm"] < base[k]["ics_norm"] for k in layers),
        "layers": len(layers),
    }


def compare_variants(runs: dict[str, covshift.Run], pairs: list[tuple[str, str]]) -> dict:
    """``{"factors": {"base/other": {"drift": factors(...), "gradient_ics": ics_ratios(...)}}, "later_step": {...},
    "gradient_ics": {variant: gradient_ics(run)}, "input_gradients": {variant: input_gradients(run)}}``
    for the ``pairs`` of ``runs``."""
    values = {name: drift_values(run) for name, run in runs.items()}
    ics = {name: gradient_ics(run) for name, run in runs.items()}
    return {
        "input_gradients": {name: input_gradients(run) for name, run in runs.items()},
        "factors": {f"{base}/{other}": {"drift": factors(values[base], values[other], base, other),
                                        "gradient_ics": ics_ratios(ics[base], ics[other])}
                    for base, other in pairs},
        "later_step": {name: later_step(run) for name, run in runs.items()},
        "gradient_ics": ics,
    }


def headline(measured: dict, accuracy: dict[str, float]) -> dict[str, float | None]:
    """The numbers a run set states over seeds, flat: ``{name: value}`` (None where undefined).

    From :func:`compare_variants`' result (``measured``) and each variant's final test accuracy:
    ``drift:<measure>:<agg>:<base>/<other>`` is the drift factor (base / other, above 1: other
    drifts less), ``ics:<relative|raw>:<base>/<other>`` the gradient ICS ratio (other / base, above 1:
    other's is higher), ``cosine:<variant>`` its mean cos∠(G, G'), ``input_grad:<spread|change>:<variant>``
    the input gradients' scale across layers and over training (:func:`input_gradients`),
    ``test_acc:<variant>`` the final accuracy.
    """
    flat: dict[str, float | None] = {}
    for pair, both in measured["factors"].items():
        for measure, by_agg in both["drift"].items():
            for agg in AGGREGATES:
                flat[f"drift:{measure}:{agg}:{pair}"] = by_agg[agg]
        for kind in ("relative", "raw"):
            flat[f"ics:{kind}:{pair}"] = _number(both["gradient_ics"][kind])
    for name, layers in measured["gradient_ics"].items():
        flat[f"cosine:{name}"] = sum(g["cosine"] for g in layers.values()) / len(layers) if layers else None
    for name, scale in measured["input_gradients"].items():
        for kind in ("spread", "change"):
            flat[f"input_grad:{kind}:{name}"] = _number(scale[kind]) if scale else None
    for name, value in accuracy.items():
        flat[f"test_acc:{name}"] = value
    return flat


def ics_sentence(ratios: dict, base: str, other: str) -> str:
    """:func:`ics_ratios` in words.

    >>> r = {"relative": 3.5, "raw": 0.5, "cosine_base": 0.98, "cosine_other": 0.7, "lower_relative": 0,
    ...      "lower_raw": 2, "layers": 3}
    >>> ics_sentence(r, "plain", "batchnorm")
    "gradient ICS, batchnorm/plain: 3.50× by ‖G − G'‖/‖G‖ (0 of 3 layers lower), 0.50× by the raw ‖G − G'‖ (2 of 3 lower); mean cos∠(G, G') 0.980 for plain, 0.700 for batchnorm"
    """
    if not ratios["layers"]:
        return "gradient ICS: no layers to compare"
    n = ratios["layers"]
    return (f"gradient ICS, {other}/{base}: {ratios['relative']:.2f}× by ‖G − G'‖/‖G‖ ({ratios['lower_relative']} of "
            f"{n} layers lower), {ratios['raw']:.2f}× by the raw ‖G − G'‖ ({ratios['lower_raw']} of {n} lower); "
            f"mean cos∠(G, G') {ratios['cosine_base']:.3f} for {base}, {ratios['cosine_other']:.3f} for {other}")


def markdown(summary: dict) -> list[str]:
    """The drift factor of each pair by each measure (channel median, then mean), and gradient ICS ratios,
    from a results summary holding ``factors`` and ``later_step``."""
    later = ", ".join(f"{name} {step}" for name, step in summary["later_step"].items())
    names = list(summary["factors"])
    lines = ["", "## Drift factors by measure (base/other: above 1, other drifts less)", "",
             "Mean over hidden layers of each layer's drift averaged over recorded steps, channels aggregated by "
             f"their median (by their mean in brackets). The later reference is the recorded step {later}.", "",
             "| measure | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for measure in MEASURES:
        cells = [summary["factors"][pair]["drift"][measure.key] for pair in names]
        lines.append(f"| {measure.label} | " + " | ".join(f"{_x(c['median'])} ({_x(c['mean'])})" for c in cells) + " |")
    lines += ["", "Gradient ICS, other/base over the layers after the first (above 1: other's is higher): "
              "relative ‖G − G'‖/‖G‖, raw ‖G − G'‖, and each one's mean cos∠(G, G').", "",
              "| pair | relative | raw | cos base | cos other |", "| --- | ---: | ---: | ---: | ---: |"]
    for pair in names:
        g = summary["factors"][pair]["gradient_ics"]
        lines.append(f"| {pair} | {_x(g['relative'])} | {_x(g['raw'])} | {g['cosine_base']:.3f} | "
                     f"{g['cosine_other']:.3f} |")
    scales = {name: scale for name, scale in summary.get("input_gradients", {}).items() if scale}
    if scales:
        lines += ["", "Input gradients ∂loss/∂(layer input), scale = mean over channels of their std, per layer "
                  "and recorded step: largest layer / smallest (median over steps), last step / first (median "
                  "over layers), the median layer's scale at the first and last recorded step.", "",
                  "| variant | layers | spread across layers | last/first | first | last |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {name} | {g['layers']} | {_x(g['spread'])} | {_x(g['change'])} | {g['first']:.3g} | "
                  f"{g['last']:.3g} |" for name, g in scales.items()]
    return lines


def _x(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.3g}×"


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def _number(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)
