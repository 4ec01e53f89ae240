"""Results of the BatchNorm experiment, computed from its stored runs: tables, verdict, report.

Everything here reads the output directory that training wrote (``plain/``,
``batchnorm/``, ``experiment.json``), so results can be recomputed at any time
without training again (``covshift experiment mnist-bn --from-runs --out DIR``).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pandas as pd

import covshift
from covshift.experiments import comparison, factors

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
REPORT_DIR = "report"
LABELS = {"plain": "no BN", "batchnorm": "BN"}
CURVE_COLUMNS = ("train_loss", "train_acc", "test_loss", "test_acc")


def write_results(out: str | Path, *, report: bool = True) -> dict:
    """Write ``results.json``, ``results.md`` and (with ``report``) ``report/`` for the experiment in ``out``.

    Args:
        out: the experiment's output directory.
        report: also write the HTML drift report.

    Returns:
        The content of ``results.json``.

    Raises:
        FileNotFoundError: ``out`` holds no finished experiment.
    """
    out = Path(out)
    if not (out / "experiment.json").is_file():
        raise FileNotFoundError(
            f"{out / 'experiment.json'} is missing: {out} holds no finished mnist-bn experiment"
        )
    experiment = json.loads((out / "experiment.json").read_text())
    runs = {name: covshift.load(out / name) for name in LABELS}
    epochs = {name: _epochs(run) for name, run in runs.items()}
    drift = comparison.compare(runs["plain"], runs["batchnorm"])
    report_path = None
    if report:
        report_path = comparison.write_report([runs["plain"], runs["batchnorm"]], out / REPORT_DIR,
                                              experiment["data"].get("notice"))
    final = {name: frame.iloc[-1][["epoch", *CURVE_COLUMNS]].to_dict() for name, frame in epochs.items()}
    measured = factors.compare_variants(runs, [("plain", "batchnorm")])
    content = {
        "command": command_line(experiment["config"]),
        "config": experiment["config"],
        "data": experiment["data"],
        "seconds": experiment.get("seconds", {}),
        "models": {
            name: {**experiment["models"][name], "epochs": epochs[name].to_dict("records"), "final": final[name]}
            for name in LABELS
        },
        "drift": drift,
        **measured,
        "headline": factors.headline(measured, {name: final[name]["test_acc"] for name in LABELS}),
        "report": str(Path(REPORT_DIR) / report_path.name) if report_path is not None else None,
    }
    (out / RESULTS_JSON).write_text(json.dumps(content, indent=2, default=float))
    (out / RESULTS_MD).write_text(render_markdown(content, epochs))
    return content


def command_line(config: dict) -> str:
    """The ``covshift experiment mnist-bn`` command that reproduces ``config``."""
    words = ["covshift", "experiment", "mnist-bn"]
    for key in ("epochs", "batch_size", "lr", "momentum", "seed", "out", "dataset", "data_dir",
                "train_split", "test_split", "every", "probe_every", "probe_size", "ics_every"):
        if config.get(key) is not None:
            words += [f"--{key.replace('_', '-')}", str(config[key])]
    if not config.get("download", True):
        words.append("--no-download")
    return shlex.join(words)


def _epochs(run: covshift.Run) -> pd.DataFrame:
    curves = run.curves()
    if curves.empty:
        raise ValueError(f"run {run.directory} logged no epochs; it did not finish training")
    curves = curves.sort_values("step").drop_duplicates("epoch", keep="last")
    curves["epoch"] = curves["epoch"].astype(int)
    return curves[["epoch", "step", *CURVE_COLUMNS]].reset_index(drop=True)


def render_markdown(content: dict, epochs: dict[str, pd.DataFrame]) -> str:
    """``results.md``: data, command, per-epoch table, final accuracies, drift table and verdict, summaries."""
    data = content["data"]
    lines = ["# MNIST CNN with vs. without BatchNorm", ""]
    if data.get("notice"):
        lines += ["```", data["notice"], "```", ""]
    lines += [
        "Command:",
        "",
        "```",
        content["command"],
        "```",
        "",
        f"Data ({data['dataset']}):",
        "",
        f"- train `{data['train']['split']}`: {data['train']['examples']:,} examples — {_source(data['train'])}",
        f"- test `{data['test']['split']}`: {data['test']['examples']:,} examples — {_source(data['test'])}",
        "",
        "## Accuracy per epoch",
        "",
        "Train loss and accuracy are averaged over each epoch's training batches (training mode);",
        "test loss and accuracy are measured after the epoch in eval mode.",
        "",
        _per_epoch_table(epochs),
        "",
        "## Final epoch",
        "",
        "| model | train acc | test acc | train loss | test loss | trainable params | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in LABELS.items():
        final = content["models"][name]["final"]
        seconds = content["seconds"].get(name, "")
        lines.append(
            f"| {label} | {final['train_acc']:.2%} | {final['test_acc']:.2%} | {final['train_loss']:.4f} "
            f"| {final['test_loss']:.4f} | {content['models'][name]['trainable_params']:,} | {seconds} |"
        )
    lines += ["", "## Drift of the convolutions' inputs", "", comparison.to_markdown(content["drift"]), ""]
    lines += [*factors.markdown(content), ""]
    if content.get("report"):
        lines += [f"Drift report: [{content['report']}]({content['report']})", ""]
    lines += ["## Models", ""]
    for name, label in LABELS.items():
        lines += [f"{label} (`{name}/`):", "", "```", content["models"][name]["summary"], "```", ""]
    return "\n".join(lines)


def _source(split: dict) -> str:
    """Where a split came from; for the fallback without the reason, which the notice above gives."""
    return split["source"].split(", because ", 1)[0]


def _per_epoch_table(epochs: dict[str, pd.DataFrame]) -> str:
    header = ["epoch"] + [f"{label} {col.replace('_', ' ')}" for label in LABELS.values() for col in CURVE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---:"] * len(header)) + " |"]
    plain, bn = epochs["plain"].set_index("epoch"), epochs["batchnorm"].set_index("epoch")
    for epoch in plain.index.union(bn.index):
        cells = [str(epoch)]
        for frame in (plain, bn):
            for col in CURVE_COLUMNS:
                value = frame[col].get(epoch)
                cells.append("" if value is None else (f"{value:.2%}" if col.endswith("acc") else f"{value:.4f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
