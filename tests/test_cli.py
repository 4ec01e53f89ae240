"""The ``covshift`` command, run through its entry point in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from covshift.cli import main


def covshift_cmd(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "covshift", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "error" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0]


def test_console_script_points_at_main():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "covshift"]
    assert script.value == "covshift.cli:main"


def test_stats_describes_the_run(run_dirs, runs):
    result = covshift_cmd("stats", run_dirs[0])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"run 'plain' at {run_dirs[0]}" in out
    channels = int(runs[0].layers["channels"].sum())
    assert f"{len(runs[0].layers)} layers, {channels} channels" in out
    steps = runs[0].stats(source="train")["step"]
    assert any(line.split()[:4] == ["train", str(steps.nunique()), str(steps.min()), str(steps.max())]
               for line in out.splitlines())
    assert "probe_a" in out and "size on disk:" in out and "training curves: " in out


def test_stats_of_one_layer_prints_it_per_step(run_dirs, runs):
    result = covshift_cmd("stats", run_dirs[0], "--layer", "fc")
    assert result.returncode == 0, result.stderr
    header, _, *rows = result.stdout.strip().splitlines()
    assert header.split() == ["channels", "mean", "sd", "min", "max", "zero_frac"]
    stats = runs[0].stats(source="train")
    fc = stats[stats.layer == "fc"]
    assert len(rows) == fc.step.nunique()
    first = rows[0].split()
    assert first[:3] == ["fc", str(fc.step.min()), str((fc.step == fc.step.min()).sum())]
    assert float(first[3]) == pytest.approx(fc[fc.step == fc.step.min()]["mean"].mean(), rel=1e-3)
    assert_one_line_error(covshift_cmd("stats", run_dirs[0], "--layer", "nope"), "no recorded layer 'nope'", "conv")
    assert_one_line_error(covshift_cmd("stats", run_dirs[0], "--source", "probe"), "--source", "--layer")


def test_compare_prints_a_per_layer_table(run_dirs):
    result = covshift_cmd("compare", *run_dirs, "--metric", "mean_shift")
    assert result.returncode == 0, result.stderr
    title, header, *rows = result.stdout.strip().splitlines()
    assert title.startswith("mean shift (× σ_ref) drift from the first recorded step")
    assert "A = plain" in title and "B = bn" in title
    columns = header.split()
    assert columns[:6] == ["layer", "type", "mean_a", "mean_b", "mean_ratio", "final_a"]
    table = {row.split()[0]: dict(zip(columns, row.split())) for row in rows}
    assert sorted(table) == ["conv", "fc"]  # the layers both runs have
    fc = {k: float(v) for k, v in table["fc"].items() if k not in ("layer", "type")}
    assert fc["mean_ratio"] == pytest.approx(fc["mean_b"] / fc["mean_a"], rel=1e-3)
    assert fc["final_ratio"] == pytest.approx(fc["final_b"] / fc["final_a"], rel=1e-3)


def test_compare_rejects_an_unknown_metric(run_dirs, capsys):
    assert main(["compare", *map(str, run_dirs), "--metric", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("covshift compare: error: metric must be")
    assert "'nope'" in err


def test_report_takes_metric_all(run_dirs, tmp_path, capsys):
    assert main(["report", str(run_dirs[0]), "-o", str(tmp_path / "out"), "--metric", "all", "--layers", "fc"]) == 0
    assert (tmp_path / "out" / "report.html").exists(), capsys.readouterr().err


def test_report_writes_the_page(run_dirs, tmp_path):
    result = covshift_cmd("report", *run_dirs, "-o", tmp_path / "out", "--metric", "ks", "--layers", "conv")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {tmp_path / 'out' / 'report.html'}"
    assert (tmp_path / "out" / "report.html").stat().st_size > 10_000


def test_a_missing_run_is_a_one_line_error(tmp_path):
    missing = tmp_path / "no-such-run"
    assert_one_line_error(covshift_cmd("stats", missing), "covshift stats: error:", str(missing), "does not exist")


@pytest.mark.parametrize("command", ["report", "compare"])
def test_a_missing_run_is_a_one_line_error_in_every_command(command, run_dirs, tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    args = {"report": [missing, "-o", tmp_path], "compare": [run_dirs[0], missing]}[command]
    assert main([command, *map(str, args)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"covshift {command}: error: no run at {missing}: the directory does not exist")
    assert len(err.strip().splitlines()) == 1


def test_a_directory_that_is_not_a_run_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["stats", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("covshift stats: error: ") and "meta.json is missing" in err
    assert len(err.strip().splitlines()) == 1


def test_usage_errors_exit_2_with_the_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])  # no -o
    assert exit_info.value.code == 2
    assert "the following arguments are required: -o/--out" in capsys.readouterr().err


def test_main_help_lists_every_command_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("report", "compare", "stats", "experiment"):
        assert f"\n    {command}" in out
    assert "examples:" in out


@pytest.mark.parametrize("command", ["report", "compare", "stats", "experiment", "experiment mnist-bn"])
def test_each_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: covshift {command}")
    assert f"covshift {command}" in out.split("examples:")[1]


def test_bad_option_values_are_one_line_errors(run_dirs, capsys):
    assert main(["report", str(run_dirs[0]), "-o", "/tmp/unused", "--layers", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("covshift report: error: layers='nope' matches no recorded layer")
    assert len(err.strip().splitlines()) == 1


def test_report_out_that_is_a_file_names_the_problem(run_dirs, tmp_path, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    assert main(["report", str(run_dirs[0]), "-o", str(afile)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (f"covshift report: error: -o {afile} is a file, not a directory; "
                           "choose a directory for the report")
    assert afile.read_text() == "keep me"


def test_experiment_with_a_mistyped_data_dir_is_a_one_line_error(tmp_path):
    result = covshift_cmd("experiment", "mnist-bn", "--data-dir", tmp_path / "nope", "--out", tmp_path / "out")
    assert_one_line_error(result, "covshift experiment: error: --data-dir", "nope holds no mnist train files",
                          "train-images-idx3-ubyte[.gz]", "(it does not exist)")
    assert result.returncode == 1 and not (tmp_path / "out").exists()


def test_an_empty_run_says_why_it_is_empty_in_drift_and_stats(tmp_path, capsys):
    import warnings

    import torch

    import covshift

    model = torch.nn.Linear(3, 2).eval()  # never trained: no step is recorded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with covshift.attach(model, store=tmp_path / "empty"):
            model(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"the run holds no records: nothing was recorded .*\(model\.train\(\)\)"):
        covshift.drift(covshift.load(tmp_path / "empty"))
    assert main(["stats", str(tmp_path / "empty")]) == 0
    out = capsys.readouterr().out
    assert "the run holds no records" in out and "Empty DataFrame" not in out
