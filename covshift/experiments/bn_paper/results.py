"""The Figure 1 results: numbers from the stored runs, the figures, and results.md."""

from __future__ import annotations

import json
from pathlib import Path

import covshift
from covshift.experiments import factors
from covshift.experiments.bn_paper.model import HIDDEN
from covshift.experiments.mnist_bn import EXPERIMENT_FILE
from covshift.metrics import names as metric_names
from covshift.metrics.verdict import compare_runs
from covshift.reporting.plots import plot_gradient_ics
from covshift.science.gradient_ics import GradientICS, gradient_frame
from covshift.science.null_floor import NullFloor, drift_to_null

RESULTS_JSON = "results.json"

RESULTS_MD = "results.md"

FIGURE = "figure1.png"

GRADIENT_FIGURE = "gradient_ics.png"


def unit_percentiles(run: covshift.Run, layer: str, units: int = 3, source: str = "probe") -> object:
    """The 15th, 50th and 85th percentiles of the first ``units`` units of ``layer``'s input, per step."""
    stats = run.stats(source)
    rows = stats[(stats["layer"].astype(str) == layer) & (stats["channel"] < units)]
    return rows[["step", "channel", "q0.15", "q0.5", "q0.85"]].reset_index(drop=True)


def band_widths(run: covshift.Run, layer: str = f"sig{HIDDEN}", units: int = 3) -> dict[str, float]:
    """Figure 1's band, in numbers: the 15th–85th percentile width of ``layer``'s input on the probe,
    mean over the first ``units`` units, at the first probe step (``first``), averaged over the probe
    steps of the last fifth of training (``last``), and their ratio (``growth``)."""
    frame = unit_percentiles(run, layer, units)
    width = (frame["q0.85"] - frame["q0.15"]).groupby(frame["step"]).mean()
    first, tail = float(width.iloc[0]), float(width[width.index >= 0.8 * width.index.max()].mean())
    return {"first": first, "last": tail, "growth": tail / first if first > 0 else float("nan")}


def collect_results(out: Path) -> dict:
    """Everything results.md states, computed from the stored runs."""

    experiment = json.loads((out / EXPERIMENT_FILE).read_text())
    variants = experiment["config"]["variants"]
    runs = {name: covshift.load(out / name) for name in variants}
    summary: dict = {"variants": variants, "accuracy": {}, "drift": {}, "calibration": {}}
    for name, run in runs.items():
        curves = run.curves()
        last = curves.iloc[-1]
        summary["accuracy"][name] = {"step": int(last["step"]), "test_acc": float(last["test_acc"]),
                                     "best_test_acc": float(curves["test_acc"].max())}
        table = drift_to_null(run, run.table(NullFloor.table), metric=list(metric_names()))
        table = table[table["step"] > 0]
        first = str(run.layers["layer"].iloc[0])
        data_layer = table[table["layer"].astype(str) == first]
        summary["calibration"][name] = {
            m: float(rows["value"].mean() / rows["null_mean"].mean())
            for m, rows in data_layer.groupby("metric")}
        hidden = table[table["layer"].astype(str) != first]
        summary["drift"][name] = {
            layer: {"w1": float(rows["value"].mean()), "w1_to_null_q95": float(rows["ratio_q95"].mean())}
            for layer, rows in hidden[hidden["metric"] == "wasserstein"].groupby(hidden["layer"].astype(str))}
    summary.update(factors.compare_variants(runs, pairs(variants)))
    verdicts = {}
    base = variants[0]
    for other in variants[1:]:
        v = compare_runs(runs[base], runs[other], base, other)
        ratios = summary["factors"][f"{base}/{other}"]["gradient_ics"]
        verdicts[other] = {"drift": v.headline, "drift_details": v.details,
                           "gradient_ics": factors.ics_sentence(ratios, base, other)}
    summary["verdicts"] = verdicts
    summary["bands"] = {name: band_widths(run) for name, run in runs.items()}
    summary["headline"] = factors.headline(summary, {name: acc["test_acc"] for name, acc in summary["accuracy"].items()})
    summary["headline"].update({f"band:growth:{name}": band["growth"] for name, band in summary["bands"].items()})
    summary["data"] = experiment["data"]
    summary["config"] = experiment["config"]
    return summary


def pairs(variants: list[str]) -> list[tuple[str, str]]:
    """The pairs compared: the first variant against each other, BatchNorm against each noisy variant.

    >>> pairs(["plain", "batchnorm", "noisy"])
    [('plain', 'batchnorm'), ('plain', 'noisy'), ('batchnorm', 'noisy')]
    """
    first = [(variants[0], other) for other in variants[1:]]
    return first + [("batchnorm", other) for other in variants if other.startswith("noisy") and "batchnorm" in variants
                    and variants[0] != "batchnorm"]


def write_results(out: Path) -> dict:
    """``results.json``, ``results.md`` and ``figure1.png`` from the stored runs."""
    summary = collect_results(out)
    (out / RESULTS_JSON).write_text(json.dumps(summary, indent=2))
    figure(out, summary["variants"]).savefig(out / FIGURE, dpi=110)
    gradient_figure(out, summary["variants"]).savefig(out / GRADIENT_FIGURE, dpi=110)
    (out / RESULTS_MD).write_text(to_markdown(summary))
    return summary


def figure(out: Path, variants: list[str]) -> object:
    """Figure 1's panels: test accuracy against steps, then per variant the last sigmoid input's
    15/50/85th percentiles of three units on the probe batch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * (1 + len(variants)), 3.4), layout="constrained")
    axes = fig.subplots(1, 1 + len(variants))
    last = f"sig{HIDDEN}"
    for name in variants:
        run = covshift.load(out / name)
        curves = run.curves()
        axes[0].plot(curves["step"], curves["test_acc"], label=name)
    axes[0].set(xlabel="step", ylabel="test accuracy", title="(a) test accuracy")
    axes[0].legend()
    for ax, name in zip(axes[1:], variants):
        frame = unit_percentiles(covshift.load(out / name), last)
        for unit, rows in frame.groupby("channel"):
            line = ax.plot(rows["step"], rows["q0.5"], lw=1.2, label=f"unit {unit}")[0]
            ax.fill_between(rows["step"], rows["q0.15"], rows["q0.85"], color=line.get_color(), alpha=0.2)
        ax.set(xlabel="step", ylabel=f"input of {last}", title=f"{name}: 15/50/85th percentiles")
        ax.legend(fontsize="small")
    return fig


def gradient_figure(out: Path, variants: list[str]) -> object:
    """Gradient ICS ‖G − G'‖/‖G‖ per layer against steps, one panel per variant, a shared y axis."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure


    fig = Figure(figsize=(4 * len(variants), 3.4), layout="constrained")
    axes = fig.subplots(1, len(variants), sharey=True, squeeze=False)[0]
    for ax, name in zip(axes, variants):
        frame = gradient_frame(covshift.load(out / name).table(GradientICS.table))
        plot_gradient_ics(frame[frame["layer"].astype(str) != "fc1"], "relative", ax=ax)
        ax.set_title(f"{name}: gradient ICS")
        ax.set_yscale("log")
    return fig


def to_markdown(summary: dict) -> str:
    c = summary["config"]
    lines = [
        "# BatchNorm paper, Figure 1 setting: three views of internal covariate shift",
        "",
        f"Data ({summary['config']['dataset']}): training {summary['data']['train']}; "
        f"test {summary['data']['test']}.",
        f"Settings: {c['steps']} steps, batch {c['batch_size']}, SGD lr {c['lr']} momentum {c['momentum']}, "
        f"seed {c['seed']}; recorded every {c['every']} steps, probe of {c['probe_size']} every {c['eval_every']}, "
        f"null floor ({c['null_splits']} random splits at the batch size) every {c['null_every']}, "
        f"gradient ICS every {c['ics_every']}.",
        "",
        f"![Figure 1]({FIGURE})",
        "",
        f"![Gradient ICS]({GRADIENT_FIGURE})",
        "",
        "| variant | final test acc | best test acc | at step |",
        "| --- | --- | --- | --- |",
    ]
    for name, acc in summary["accuracy"].items():
        lines.append(f"| {name} | {acc['test_acc']:.4f} | {acc['best_test_acc']:.4f} | {acc['step']} |")
    lines += ["", "## Verdicts (computed from the runs)", ""]
    for other, v in summary["verdicts"].items():
        lines += [f"- **Distributional drift** (W1 × σ_ref vs the initial step, hidden layers): {v['drift']}. "
                  f"{v['drift_details']}", f"- **Gradient ICS**: {v['gradient_ics']}."]
    lines += factors.markdown(summary)
    lines += ["", f"Figure 1's band: the 15th–85th percentile width of sig{HIDDEN}'s input on the probe, mean over "
              "units 0–2, at the first probe step and averaged over the probe steps of the last fifth of training.",
              "", "| variant | first | last fifth | last / first |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {b['first']:.3g} | {b['last']:.3g} | {b['growth']:.3g}× |"
              for name, b in summary["bands"].items()]
    lines += ["", "## Calibration: the input layer's drift / its null mean (≈ 1 when calibrated)", "",
              "| variant | " + " | ".join(sorted(next(iter(summary["calibration"].values())))) + " |",
              "| --- |" + " --- |" * len(next(iter(summary["calibration"].values())))]
    for name, ratios in summary["calibration"].items():
        lines.append(f"| {name} | " + " | ".join(f"{ratios[m]:.2f}" for m in sorted(ratios)) + " |")
    lines += ["", "## Gradient ICS per layer: mean ‖G − G'‖/‖G‖ (cos∠(G, G'))", "",
              "| layer | " + " | ".join(summary["variants"]) + " |", "| --- |" + " --- |" * len(summary["variants"])]
    lines += _layer_rows(list(next(iter(summary["gradient_ics"].values()))), summary["variants"],
                         summary["gradient_ics"], lambda g: f"{g['relative']:.3g} ({g['cosine']:.3f})")
    lines += ["", "## Drift of hidden layers: mean W1 (× σ_ref) and mean W1 / null 95th percentile", "",
              "| layer | " + " | ".join(summary["variants"]) + " |", "| --- |" + " --- |" * len(summary["variants"])]
    all_layers = list(dict.fromkeys(layer for name in summary["variants"] for layer in summary["drift"][name]))
    lines += _layer_rows(all_layers, summary["variants"], summary["drift"],
                         lambda row: f"{row['w1']:.3g} ({row['w1_to_null_q95']:.2f}×)")
    return "\n".join(lines) + "\n"

def _layer_rows(layers: list[str], variants: list[str], table: dict, cell: object) -> list[str]:
    """One markdown row per layer: ``cell(table[variant][layer])`` per variant, "–" where the layer is missing."""
    rows = []
    for layer in layers:
        values = [table[name].get(layer) for name in variants]
        rows.append(f"| {layer} | " + " | ".join(cell(v) if v else "–" for v in values) + " |")
    return rows
