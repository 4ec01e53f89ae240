"""Notebook display: what a run holds, as a small HTML table (``Run._repr_html_``)."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from covshift.store.run import Run


def run_html(run: Run) -> str:
    """The run's name, store path, steps per source and layers, as self-contained HTML."""
    rows = [
        _row(source, _count(held["steps"], "step"), f"{held['first step']} … {held['last step']}")
        for source, held in run.sources().iterrows()
    ]
    sources = "".join(rows) or "<tr><td colspan='3'>no records yet</td></tr>"
    layers = "".join(
        _row(layer.layer, layer.type, _count(layer.channels, "channel")) for layer in run.layers.itertuples()
    )
    return (
        "<div class='covshift-run'>"
        f"<p><b>covshift run {escape(run.name)}</b> at <code>{escape(str(run.directory))}</code>"
        f"{'' if run.meta.get('model') is None else ' · model ' + escape(str(run.meta['model']))}</p>"
        f"<table><thead><tr><th>source</th><th>recorded</th><th>steps</th></tr></thead>{sources}</table>"
        f"<table><thead><tr><th>layer</th><th>type</th><th>input</th></tr></thead>"
        f"{layers or '<tr><td colspan=3>no layers yet</td></tr>'}</table>"
        "</div>"
    )


def _row(*cells: object) -> str:
    return "<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in cells) + "</tr>"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
