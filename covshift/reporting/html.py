"""The report's HTML page: verdict first, then a compact per-layer table, a glossary, the figures, all numbers.

Self-contained: inline CSS, images as base64 data URIs, no links or scripts.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.colors import to_hex

from covshift.metrics import get as get_metric
from covshift.reporting.data import ReportData
from covshift.reporting.verdicts import verdict_metric
from covshift.reporting.panels import run_colors
from covshift.reporting.text import fmt, reference_words
from covshift.store.run import Run


def layer_table(table: pd.DataFrame, labels: Sequence[str], metric: str, layers: Sequence[str]) -> str:
    """The compact table of ``metric`` for ``layers``, in that order: drift, drift ÷ noise floor, ratio to the
    first run, a flag."""
    rows = table[table["metric"] == metric].set_index("layer")
    rows = rows.loc[[layer for layer in layers if layer in rows.index]]
    floors = [label for label in labels if rows[f"{label} noise"].notna().any()]
    head = ["layer"]
    for label in labels:
        head.append(f"{label} drift")
        if label in floors:
            head.append(f"{label} drift ÷ floor")
    head += [f"{label}/{labels[0]}" for label in labels[1:]]
    if floors:
        head.append("above noise floor")
    body = []
    for layer, row in rows.iterrows():
        cells, above = [html.escape(str(layer))], []
        for label in labels:
            cells.append(fmt(row[f"{label} mean"]))
            if label in floors:
                ratio = row[f"{label} mean"] / row[f"{label} noise"]
                cells.append(fmt(ratio))
                if ratio > 1:
                    above.append(label)
        cells += [fmt(row[f"{label}/{labels[0]} mean"]) for label in labels[1:]]
        if floors:
            cells.append("▲ " + html.escape(", ".join(above)) if above else "")
        mark = " class=above" if above else ""
        body.append(f"<tr{mark}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<table class=layers><tr>{header}</tr>{''.join(body)}</table>"


def glossary(data: ReportData, metrics: Sequence[str], reference: str | int) -> str:
    """Short definitions of the words and units on the page, each drawn metric's from the registry."""
    terms = [
        ("drift", f"how far a layer's input distribution has moved from the {reference_words(reference)}"
                  ", per channel, then the mean over the layer's channels; the tables average it over the "
                  "recorded steps."),
        ("× σ_ref", "divided by σ_ref, the channel's standard deviation at the reference step: 0.1 means "
                    "moved by a tenth of the reference spread, comparable across layers and networks ("
                    + ", ".join(get_metric(m).label for m in metrics if get_metric(m).scaled) + ")."),
    ]
    for name in metrics:
        metric = get_metric(name)
        line = metric.description or f"the drift metric {name!r}."
        if metric.threshold is not None:
            line += f" Conventionally drifted at {fmt(metric.threshold)} or more (docs/metrics.md, \"Thresholds\")."
        terms.append((metric.label, line))
    terms += [
        ("probe batch", "a fixed batch set aside with tracker.probe(batch), run every few steps under no_grad "
                        "without training on it, in two halves. " + data.probes),
        ("noise floor", "the same metric between the two halves of the probe batch: the drift that sampling "
                        "alone produces. Drift ÷ floor above 1 (▲) is more change than sampling noise."),
        ("channel median", "the layer's drift with its channels aggregated by their median instead of their "
                           "mean: one channel that moves far cannot dominate it. The verdict states both."),
    ]
    if any(null is not None for null in data.nulls):
        terms.append(("null 95th percentile", "the null noise floor (covshift.noise.NullFloor): the metric between "
                      "two random disjoint subsets of the probe batch, each of the training batch size, over many "
                      "random splits; 95% of the drift that sampling alone produces lies below this line. Drawn "
                      "dotted on the drift figures, as measured at each null step."))
    if any(gradients is not None for gradients in data.gradients):
        terms.append(("gradient ICS", "‖G − G'‖, how much a layer's gradient G changes when only the layers before "
                      "it take their optimizer step (G'), and cos∠(G, G') (Santurkar et al. 2018)."))
    if data.input_gradients:
        terms.append(("input gradient", "∂L/∂x, the gradient of the training loss with respect to a layer's input, "
                      "summarized per channel like the input (attach(..., gradients=True)); a layer whose gradient "
                      "scale stands 100× below or above the median layer's, or its own start, is flagged."))
    items = "".join(f"<dt>{html.escape(t)}</dt><dd>{html.escape(d)}</dd>" for t, d in terms)
    return f"<dl class=glossary>{items}</dl>"


def notice_box(notice: str) -> str:
    r"""A short amber box: the notice's first sentence as its title, its other sentences as a list.

    Banner rules (a line of one repeated character) and repeats of the first line are dropped,
    and a sentence wrapped over several lines is joined again.

    >>> notice_box("!!!!\nDATA NOTICE: fallback data;\nnot comparable.\nWhy: offline.\n!!!!")
    '<div class=notice role=note><strong>DATA NOTICE: fallback data; not comparable.</strong><ul><li>Why: offline.</li></ul></div>'
    """
    lines = [line.strip() for line in notice.strip().splitlines()]
    lines = [line for line in lines if line and len(set(line)) > 1]
    if not lines:
        return ""
    first = lines[0].rstrip(".:!").lower()
    lines = lines[:1] + [line for line in lines[1:] if line.rstrip(".:!").lower() != first]
    sentences: list[str] = []
    open_sentence = False
    for line in lines:
        if open_sentence:
            sentences[-1] += " " + line
        else:
            sentences.append(line)
        open_sentence = not line.endswith((".", "!", "?", ":", ")"))
    body = "".join(f"<li>{html.escape(sentence)}</li>" for sentence in sentences[1:])
    return (f"<div class=notice role=note><strong>{html.escape(sentences[0])}</strong>"
            + (f"<ul>{body}</ul>" if body else "") + "</div>")


#: Alerts listed on the page at most; the rest are counted.
ALERTS_SHOWN = 20


def alerts_box(alerts: Sequence[str]) -> str:
    """The alerts raised while the runs trained, first on the page (empty without any)."""
    if not alerts:
        return ""
    items = "".join(f"<li>{html.escape(alert)}</li>" for alert in alerts[:ALERTS_SHOWN])
    more = f"<p>… and {len(alerts) - ALERTS_SHOWN} more (run.alerts()).</p>" if len(alerts) > ALERTS_SHOWN else ""
    return (f"<div class=alerts role=alert><strong>{len(alerts)} alert{'s' if len(alerts) != 1 else ''} while "
            f"training</strong><ul>{items}</ul>{more}</div>")


def render_html(
    data: ReportData,
    runs: Sequence[Run],
    sections: Sequence[Any],
    out_dir: Path,
    *,
    metrics: Sequence[str],
    reference: str | int,
    source: str,
    notices: Sequence[str] = (),
) -> str:
    """The page: notice, verdict, the most drifting layers, glossary, runs, figures, and all numbers last.

    Text only: every number comes from ``data``; ``runs`` give their names and directories; the
    ``sections``' PNGs in ``out_dir`` are embedded.
    """
    table, labels, short = data.table, data.labels, data.short_note
    metric = verdict_metric(metrics)
    name = get_metric(metric).axis_label()
    verdict = "".join(
        f"<p class=headline>{html.escape(head)}</p>" + (f"<p>{html.escape(more)}</p>" if more else "")
        for head, more in data.verdicts
    )
    total = len(set(table["layer"]))
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        "<title>covshift report</title>",
        f"<style>{_CSS}</style></head><body>",
        *(notice_box(notice) for notice in notices),
        alerts_box(data.alerts),
        "<h1>covshift drift report</h1>",
        "<section id=verdict>",
        verdict,
        f"<p class=short>{html.escape(short)}</p>" if short else "",
        *(f"<p class=short>{html.escape(flag)}.</p>" for flag in data.gradient_flags),
        f"<p class=basis>Drift: mean {html.escape(name)} of each layer's input (mean over channels; the verdict "
        f"also by the channel median) from the {html.escape(reference_words(reference))}, averaged over "
        f"the recorded steps of the {html.escape(source)} records.</p>",
        layer_table(table, labels, metric, data.ranked),
        f"<p class=basis>{html.escape(detail_note(data.ranked, data.detail, total, name))}</p>",
        "</section>",
        "<h2>Words on this page</h2>",
        glossary(data, metrics, reference),
        "<h2>Runs</h2>",
        _runs_table(runs, labels),
    ]
    for section in sections:
        encoded = base64.b64encode((out_dir / section.file).read_bytes()).decode("ascii")
        parts += [
            f"<h2>{html.escape(section.title)}</h2>",
            f"<p>{html.escape(section.caption)}</p>",
            f"<img alt='{html.escape(section.title)}' src='data:image/png;base64,{encoded}'>",
        ]
    if short and not any(section.name.startswith("drift") for section in sections):
        parts.append(f"<h2>Drift figures</h2><p class=short>Not drawn: {html.escape(short)}</p>")
    parts += [
        "<h2>All numbers</h2>",
        "<p>Per metric and layer: mean drift over all recorded steps, drift at the last step and the mean "
        "noise floor (– without a probe)"
        + (", and each run's value divided by the first run's (below 1: drifts less)." if len(runs) > 1 else ".")
        + " Also in summary.csv.</p>",
        _numbers_table(table),
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part)


def detail_note(ranked: Sequence[str], detail: Sequence[str], total: int, name: str) -> str:
    """Which layers the table lists and which got detail figures, and why; where the others are.

    >>> import textwrap
    >>> print(textwrap.fill(detail_note(["fc", "conv"], ["conv", "fc"], 2, "W1"), 100))
    All 2 layers, by mean W1 drift over the recorded steps (the largest of the runs), most first; each
    has detail figures.
    >>> print(textwrap.fill(detail_note(["c", "b"], ["a", "b", "c"], 5, "W1"), 100))
    The 2 of 5 layers that drift most by mean W1 drift over the recorded steps (the largest of the
    runs), most first. Detail figures are drawn for the layers listed and the layers asked for with
    layers= (a); the other 2 layers are in the heatmap and under All numbers.
    """
    by = f"by mean {name} drift over the recorded steps (the largest of the runs)"
    asked = [layer for layer in detail if layer not in ranked]
    if len(ranked) == total and not asked:
        return f"All {total} layers, {by}, most first; each has detail figures."
    listed = f"The {len(ranked)} of {total} layers that drift most {by}, most first." if ranked else "No layer listed (top=0)."
    why = []
    if ranked:
        why.append("the layers listed")
    if asked:
        why.append(f"the layers asked for with layers= ({', '.join(asked)})")
    if not why:
        return f"{listed} No detail figures: every layer is in the heatmap and under All numbers."
    others = total - len(detail)
    return (f"{listed} Detail figures are drawn for {' and '.join(why)}; the other {others} layers are in the "
            "heatmap and under All numbers.")


def _runs_table(runs: Sequence[Run], labels: Sequence[str]) -> str:
    colors = run_colors(len(runs))
    rows = "".join(
        f"<tr><td><span class=swatch style='background:{to_hex(color)}'></span>{html.escape(label)}</td>"
        f"<td>{html.escape(str(run.directory))}</td><td>{len(run.layers)}</td>"
        f"<td>{html.escape(str(run.meta.get('model', '')))}</td></tr>"
        for run, label, color in zip(runs, labels, colors)
    )
    return f"<table><tr><th>run</th><th>directory</th><th>layers</th><th>model</th></tr>{rows}</table>"


def _numbers_table(table: pd.DataFrame) -> str:
    shown = table.assign(metric=table["metric"].map(lambda name: get_metric(name).axis_label()))
    shown.columns = [f"{c} floor" if str(c).endswith(" noise") else c for c in shown.columns]
    return shown.to_html(index=False, float_format=fmt, na_rep="–", border=0, classes="summary")


_CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}"
    "h1{font-size:1.4em;margin:0.4em 0}"
    "#verdict{border-left:6px solid #2a6;background:#f3faf5;padding:0.4em 1em;margin:0.5em 0 1em}"
    "#verdict .headline{font-size:1.35em;font-weight:bold;margin:0.3em 0}"
    "#verdict p{margin:0.3em 0}.basis{color:#555;font-size:13px}"
    ".short{border:1px solid #c80;background:#fff6e0;padding:0.4em 0.8em}"
    ".notice{border-left:6px solid #d90;background:#fff8e6;padding:0.4em 1em;margin:0.5em 0;font-size:14px}"
    ".notice ul{margin:0.2em 0;padding-left:1.4em}"
    ".alerts{border-left:6px solid #c33;background:#fdecec;padding:0.4em 1em;margin:0.5em 0;font-size:14px}"
    ".alerts ul{margin:0.2em 0;padding-left:1.4em}"
    "tr.above td{background:#fff0e6}"
    "table{border-collapse:collapse;margin:0.6em 0;font-size:14px}"
    "td,th{border-bottom:1px solid #ddd;padding:3px 10px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}"
    ".summary td:nth-child(2),.summary th:nth-child(2){text-align:left}"
    "dl.glossary{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;font-size:14px}"
    "dl.glossary dt{font-weight:bold}dl.glossary dd{margin:0}"
    "img{max-width:100%;display:block;margin:1em 0}"
    ".swatch{display:inline-block;width:12px;height:12px;margin-right:6px;vertical-align:middle}"
)
