"""Notebook display of a run: ``Run._repr_html_`` names what the run holds."""

from __future__ import annotations

import re

import torch
from torch import nn

import covshift


def _cells(html: str) -> list[list[str]]:
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", html)]


def test_run_html_shows_layers_steps_sources_and_path(runs):
    run = runs[0]
    html = run._repr_html_()
    assert str(run.directory) in html and "covshift run plain" in html
    cells = _cells(html)
    stats = run.stats()
    for source, part in stats.groupby("source"):
        steps = part["step"]
        assert [source, f"{steps.nunique()} steps" if steps.nunique() > 1 else "1 step", f"{steps.min()} … {steps.max()}"] in cells
    assert ["conv", "Conv2d", "1 channel"] in cells
    assert ["fc", "Linear", "64 channels"] in cells


def test_run_html_escapes_names_and_handles_an_empty_run(tmp_path):
    model = nn.Linear(3, 2)
    tracker = covshift.attach(model, store=tmp_path / "r", name="<b>a&b</b>")
    html = tracker.run._repr_html_()
    assert "&lt;b&gt;a&amp;b&lt;/b&gt;" in html and "<b>a&b</b>" not in html
    assert "no records yet" in html
    model(torch.randn(4, 3))
    tracker.detach()
    assert ["train", "1 step", "0 … 0"] in _cells(covshift.load(tmp_path / "r")._repr_html_())
