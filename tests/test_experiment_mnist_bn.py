"""The BatchNorm experiment end to end, on a tiny synthetic MNIST written as IDX files."""

from __future__ import annotations

import argparse
import dataclasses
import json
import runpy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import covshift
from covshift.cli import main
from covshift.experiments import data, mnist_bn, results
from covshift.metrics.verdict import compare_runs

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mnist_bn_vs_nobn.py"
CONVS = ["block1.conv", "block2.conv", "transition.conv", "block3.conv", "block4.conv", "block5.conv", "classifier"]


@pytest.fixture(scope="module")
def data_dir(quadrant_mnist: Callable[[int, int], Path]) -> Path:
    """A torchvision-layout MNIST folder with 128 train and 32 test digits: the label is the bright quadrant."""
    return quadrant_mnist(128, 32)


def tiny(data_dir: Path, out: Path, **changes: object) -> mnist_bn.Config:
    settings = dict(epochs=1, batch_size=32, every=1, probe_every=2, probe_size=16, ics_every=2, out=str(out),
                    data_dir=str(data_dir), cache_dir=str(out.parent / "cache"), download=False,
                    report=False, progress=False)
    settings.update(changes)
    return mnist_bn.Config(**settings)


@pytest.fixture(scope="module")
def finished(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "run"
    mnist_bn.run_experiment(tiny(data_dir, out, epochs=2, train_split="train[:50%]"))
    return out


def test_writes_both_runs_and_the_results(finished: Path) -> None:
    for name in ("plain", "batchnorm"):
        run = covshift.load(finished / name)
        assert list(run.layers["layer"]) == CONVS  # the same conv names in both nets
        stats = run.stats()
        assert {"train", "probe", "probe_a", "probe_b"} <= set(stats["source"])
        assert stats.loc[stats["source"] == "train", "step"].nunique() == 2 * 2  # 64 digits / 32, 2 epochs
        curves = run.curves()
        assert list(curves["epoch"]) == [1, 2]
        assert list(curves["step"]) == [1, 3]
        assert curves[["train_acc", "test_acc"]].stack().between(0, 1).all()
    content = json.loads((finished / "results.json").read_text())
    assert content["data"]["train"]["examples"] == 64 and content["data"]["test"]["examples"] == 32
    assert content["data"]["notice"] is None
    assert content["models"]["batchnorm"]["trainable_params"] - content["models"]["plain"]["trainable_params"] == 368
    assert [e["epoch"] for e in content["models"]["plain"]["epochs"]] == [1, 2]
    assert "--train-split 'train[:50%]'" in content["command"]
    text = (finished / "results.md").read_text()
    assert "## Accuracy per epoch" in text and "BatchNorm2d-2" in text and "DATA NOTICE" not in text
    final = content["models"]["batchnorm"]["final"]
    assert f"{final['test_acc']:.2%}" in text


def test_drift_table_compares_the_convolutions_and_the_verdict_follows(finished: Path) -> None:
    drift = json.loads((finished / "results.json").read_text())["drift"]
    assert [(m["metric"], m["reference"]) for m in drift["measures"]] == [
        ("wasserstein", "initial"), ("wasserstein", "previous"), ("mean_shift", "initial"), ("std_ratio", "initial")]
    for measure in drift["measures"]:
        rows = {row["layer"]: row for row in measure["rows"]}
        assert list(rows) == CONVS
        # the first convolution reads the same images in both nets: identical drift
        assert rows["block1.conv"]["plain"] == rows["block1.conv"]["batchnorm"]
        assert all(row["noise_plain"] is not None and row["noise_plain"] >= 0 for row in rows.values())
    hidden = drift["measures"][0]["rows"][1:]
    factor = np.mean([r["plain"] for r in hidden]) / np.mean([r["batchnorm"] for r in hidden])
    lower = sum(r["batchnorm"] < r["plain"] for r in hidden)
    expected = f"{factor:.1f}× less" if factor > 1 else f"{1 / factor:.1f}× more"
    assert f"BN drifts {expected} than no BN by the channel mean ({lower} of 6 hidden layers lower)" in drift["verdict"]
    # the same verdict, by the channel mean and the channel median, as bn-paper and the report state it
    runs = [covshift.load(finished / name) for name in ("plain", "batchnorm")]
    same = compare_runs(*runs, "no BN", "BN")
    assert f"{same.headline}. {same.details}" in drift["verdict"] and "by the channel median" in same.headline
    assert f"**Verdict:** {drift['verdict']}" in (finished / "results.md").read_text()


def test_gradient_ics_of_the_convolutions_is_measured_and_compared(finished: Path) -> None:
    content = json.loads((finished / "results.json").read_text())
    for name in ("plain", "batchnorm"):
        table = covshift.load(finished / name).table("gradients")
        assert sorted(table["step"].unique()) == [0, 2]  # 4 optimizer steps, every 2
        assert list(dict.fromkeys(table["layer"])) == CONVS
        assert set(content["gradient_ics"][name]) == set(CONVS[1:])  # the first has no earlier layer
    ratios = content["factors"]["plain/batchnorm"]["gradient_ics"]
    mean = {name: np.mean([g["ics_norm"] for g in content["gradient_ics"][name].values()])
            for name in ("plain", "batchnorm")}
    assert ratios["raw"] == pytest.approx(mean["batchnorm"] / mean["plain"]) and ratios["layers"] == 6
    head = content["headline"]
    assert head["ics:raw:plain/batchnorm"] == pytest.approx(ratios["raw"])
    assert head["test_acc:batchnorm"] == content["models"]["batchnorm"]["final"]["test_acc"]
    assert head["drift:w1_sigma:mean:plain/batchnorm"] == pytest.approx(
        content["factors"]["plain/batchnorm"]["drift"]["w1_sigma"]["mean"])
    text = (finished / "results.md").read_text()
    assert "## Drift factors by measure" in text and "| KS vs step 0 |" in text


def test_seeds_run_into_their_folders_and_the_report_states_the_interval(data_dir: Path, tmp_path: Path) -> None:
    out = mnist_bn.run_seeded(tiny(data_dir, tmp_path / "seeds", train_split="train[:50%]", seeds=2, report=True))
    assert sorted(p.name for p in out.iterdir()) == ["report", "seed-1", "seed-2", "seeds.json", "seeds.md"]
    assert not (out / "seed-1" / "report").exists()  # one report, of every seed
    content = json.loads((out / "seeds.json").read_text())
    assert content["seeds"] == [1, 2] and content["command"].endswith("--seeds 2")
    assert len(content["values"]["drift:w1_sigma:median:plain/batchnorm"]) == 2
    page = (out / "report" / "report.html").read_text()
    assert "plain/batchnorm mean W1" in page and "2 seeds paired in order" in page
    assert "95% percentile bootstrap of the median" in page
    before = (out / "seeds.md").read_text()
    (out / "seeds.md").unlink()
    assert main(["experiment", "mnist-bn", "--from-runs", "--out", str(out)]) == 0  # every seed, then seeds.md
    assert (out / "seeds.md").read_text() == before


def test_same_command_twice_gives_the_same_numbers(finished: Path, data_dir: Path, tmp_path: Path) -> None:
    again = mnist_bn.run_experiment(tiny(data_dir, tmp_path / "again", epochs=2, train_split="train[:50%]"))
    for name in ("plain", "batchnorm"):
        first, second = covshift.load(finished / name), covshift.load(again / name)
        pd.testing.assert_frame_equal(first.curves(), second.curves())
        columns = ["step", "source", "layer", "channel", "mean", "var", "q0.5"]
        pd.testing.assert_frame_equal(first.stats()[columns], second.stats()[columns])


def test_both_models_see_the_same_batches(finished: Path) -> None:
    plain, bn = covshift.load(finished / "plain").stats("train"), covshift.load(finished / "batchnorm").stats("train")
    first = [frame[frame["layer"] == "block1.conv"].reset_index(drop=True) for frame in (plain, bn)]
    pd.testing.assert_frame_equal(first[0][["step", "mean", "var", "min", "max"]], first[1][["step", "mean", "var", "min", "max"]])
    hidden = [frame[frame["layer"] == "block3.conv"]["mean"].to_numpy() for frame in (plain, bn)]
    assert not np.allclose(hidden[0], hidden[1])  # BatchNorm changes what the hidden layers see


def test_results_can_be_recomputed_from_the_runs(finished: Path) -> None:
    before = (finished / "results.md").read_text()
    (finished / "results.md").unlink()
    parser = argparse.ArgumentParser()
    mnist_bn.add_arguments(parser)
    args = parser.parse_args(["--from-runs", "--out", str(finished), "--no-report"])
    assert mnist_bn.run_from_args(args) == finished
    assert (finished / "results.md").read_text() == before


def test_command_line_defaults() -> None:
    parser = argparse.ArgumentParser()
    mnist_bn.add_arguments(parser)
    defaults = parser.parse_args([])
    assert (defaults.epochs, defaults.batch_size, defaults.lr, defaults.momentum, defaults.seed, defaults.out) == (
        10, 128, 0.01, 0.9, 1, "runs/mnist-bn")
    assert (defaults.dataset, defaults.train_split, defaults.test_split, defaults.report) == (
        "mnist", "train", "test", True)


def test_example_script_runs_the_experiment(data_dir: Path, tmp_path: Path) -> None:
    main = runpy.run_path(str(EXAMPLE))["main"]
    out = main(["--epochs", "1", "--batch-size", "64", "--data-dir", str(data_dir), "--out",
                str(tmp_path / "cli"), "--train-split", "train[:64]", "--test-split", "test[:16]",
                "--no-report", "--no-progress", "--no-download", "--cache-dir", str(tmp_path / "c")])
    content = json.loads((out / "results.json").read_text())
    assert content["config"]["batch_size"] == 64 and content["data"]["test"]["examples"] == 16
    # one batch is one recorded step: nothing to measure drift against, and the results say so
    assert content["drift"]["verdict"] is None
    assert "Drift not measured: a run recorded 1 train step(s)" in (out / "results.md").read_text()


def test_existing_output_is_not_overwritten(finished: Path, data_dir: Path) -> None:
    with pytest.raises(FileExistsError, match="already holds a run"):
        mnist_bn.run_experiment(tiny(data_dir, finished))


def test_an_out_that_is_a_file_is_named_before_any_data_is_read(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file; choose a directory"):
        mnist_bn.run_experiment(tiny(tmp_path / "no-data-here", tmp_path / "file"))


def test_example_script_reports_bad_settings_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main = runpy.run_path(str(EXAMPLE))["main"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--epochs", "0", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: epochs must be a positive int, got 0")


@pytest.mark.parametrize(("setting", "value"), [("epochs", 0), ("batch_size", -1), ("lr", 0.0), ("momentum", 1.0),
                                                ("probe_size", 1), ("dataset", "cifar")])
def test_bad_settings_name_the_setting(setting: str, value: object, data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{setting} must .*{value!r}"):
        mnist_bn.run_experiment(tiny(data_dir, tmp_path / "bad", **{setting: value}))
    assert not (tmp_path / "bad").exists()


def test_offline_fallback_is_announced_once_and_says_what_was_used(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    config = dataclasses.replace(tiny(tmp_path, tmp_path / "fallback", train_split="train[:96]",
                                      test_split="test[:32]", report=True), data_dir=None)
    out = mnist_bn.run_experiment(config)
    printed = capsys.readouterr().out
    assert printed.count("DATA NOTICE") == 1
    content = json.loads((out / "results.json").read_text())
    notice = content["data"]["notice"]
    assert content["data"]["train"]["fallback"] and content["data"]["test"]["fallback"]
    assert notice.splitlines()[1].startswith("DATA NOTICE: offline fallback data in use")
    assert "train: 96 digits (--train-split 'train[:96]' of the fallback's 4000 train digits)" in notice
    assert "test: 32 digits (--test-split 'test[:32]' of the fallback's 1000 test digits)" in notice
    assert "--data-dir DIR" in notice and notice in printed
    page = (out / "results.md").read_text()
    assert page.count("DATA NOTICE") == 1 and page.count("looked for") == 1 and notice in page
    html = (out / "report" / "report.html").read_text()
    assert content["report"] == "report/report.html"
    assert html.count("DATA NOTICE") == 1 and html.index("DATA NOTICE: offline fallback data in use") < html.index("<img")
    # reported again later, from the experiment's folder: its runs, and the notice they carry, as one sentence
    assert main(["report", str(out), "-o", str(tmp_path / "again")]) == 0
    again = (tmp_path / "again" / "report.html").read_text()
    box = again[again.index("<div class=notice"):again.index("</div>")]
    assert box.startswith("<div class=notice role=note><strong>DATA NOTICE: offline fallback data in use, not the "
                          "official MNIST splits; accuracies are not comparable to full MNIST.</strong><ul><li>Why:")
    assert "batchnorm drifts" in again and "than plain" in again  # plain, recorded first, is the baseline


def test_a_mistyped_data_dir_is_an_error_before_training(tmp_path: Path) -> None:
    with pytest.raises(data.DataUnavailableError, match=r"--data-dir .*nope holds no mnist train files"):
        mnist_bn.run_experiment(tiny(tmp_path / "nope", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_from_runs_says_where_the_results_went(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    mnist_bn.add_arguments(parser)
    mnist_bn.run_from_args(parser.parse_args(["--from-runs", "--out", str(finished), "--no-report"]))
    assert capsys.readouterr().out.strip() == f"results: {finished / 'results.md'}"


def test_results_need_a_finished_experiment(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no finished mnist-bn experiment"):
        results.write_results(tmp_path)
