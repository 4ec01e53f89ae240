"""Runs of different architectures compared layer by layer: pairing by name, then by type and channel count."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import covshift
from covshift.cli import main
from covshift.reporting.comparison import match_layers

ROOT = Path(__file__).resolve().parents[1]


def _run(model: nn.Module, name: str, directory: Path, steps: int = 4) -> covshift.Run:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with covshift.attach(model, every=1, name=name, store=directory / name) as tracker:
        for _ in range(steps):
            model(torch.randn(16, 6, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    return tracker.run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("matching")
    torch.manual_seed(0)
    plain = _run(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), "plain", root)
    bn = _run(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8),
                            nn.ReLU(), nn.Linear(8, 2)), "bn", root)
    return plain, bn


def _verdict(page: Path) -> str:
    html = page.read_text(encoding="utf-8")
    return re.sub(r"<[^>]+>", " ", html[html.index("<section id=verdict>"):html.index("</section>")])


def test_layers_pair_by_name_then_by_type_and_channel_count_in_model_order(runs):
    plain, bn = runs
    # plain: 0 Linear(6), 2 Linear(8), 4 Linear(8); bn: 0 Linear(6), 1 BN(8), 3 Linear(8), 4 BN(8), 6 Linear(8)
    assert match_layers(plain, bn) == {"0": "0", "3": "2", "6": "4"}
    assert match_layers(plain, plain) == {name: name for name in plain.layers["layer"]}


def test_explicit_pairs_come_first_and_unknown_layers_are_named(runs):
    plain, bn = runs
    assert match_layers(plain, bn, {"6": "2"}) == {"6": "2", "0": "0", "3": "4"}
    with pytest.raises(ValueError, match=r"layer '9', which run 'bn' did not record; it recorded 0, 1, 3"):
        match_layers(plain, bn, {"9": "2"})


def test_the_report_verdict_compares_paired_layers_and_names_them(runs, tmp_path):
    plain, bn = runs
    verdict = _verdict(covshift.report([plain, bn], tmp_path / "report"))
    assert "no hidden layer of both" not in verdict
    assert re.search(r"bn drifts [0-9.]+× (less|more) than plain", verdict)
    assert "layer 3 of bn ↔ layer 2 of plain; layer 6 of bn ↔ layer 4 of plain" in verdict
    explicit = _verdict(covshift.report([plain, bn], tmp_path / "explicit", match={"6": "2", "3": "4"}))
    assert "layer 6 of bn ↔ layer 2 of plain; layer 3 of bn ↔ layer 4 of plain" in explicit


def test_the_ratio_columns_divide_paired_layers(runs, tmp_path):
    import pandas as pd

    plain, bn = runs
    page = covshift.report([plain, bn], tmp_path / "report", metrics="wasserstein")
    table = pd.read_csv(page.parent / "summary.csv", dtype={"layer": str}).set_index("layer")
    assert table.loc["2", "bn/plain mean"] == pytest.approx(table.loc["3", "bn mean"] / table.loc["2", "plain mean"])
    assert pd.isna(table.loc["1", "bn/plain mean"])  # a layer of bn only: nothing to divide by


def test_the_command_takes_match_pairs(runs, tmp_path, capsys):
    plain, bn = runs
    out = tmp_path / "cli"
    assert main(["report", str(plain.directory), str(bn.directory), "-o", str(out), "--match", "6=2", "3=4"]) == 0
    assert "layer 6 of bn ↔ layer 2 of plain" in _verdict(out / "report.html")


def test_a_bad_match_pair_is_a_usage_error(runs, tmp_path, capsys):
    plain, _ = runs
    with pytest.raises(SystemExit) as stop:
        main(["report", str(plain.directory), "-o", str(tmp_path / "x"), "--match", "6"])
    assert stop.value.code == 2 and "expected LATER=FIRST" in capsys.readouterr().err


def test_the_readme_quickstart_gets_a_verdict_naming_the_paired_layers(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(quickstart, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102
    verdict = _verdict(tmp_path / "report" / "report.html")
    assert re.search(r"batchnorm drifts [0-9.]+× (less|more) than plain", verdict)
    assert "layer 3 of batchnorm ↔ layer 2 of plain" in verdict
