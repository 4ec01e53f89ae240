"""Run storage: round trips, streaming, bounded memory, crash safety, clear errors."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import covshift
from covshift.store.files import RunFileError


def record_steps(model, steps, **kwargs):
    tracker = covshift.attach(model, every=1, **kwargs)
    for _ in range(steps):
        model(torch.randn(8, 4))
    return tracker.detach()


def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_save_and_load_round_trip(tmp_path):
    run = record_steps(mlp(), 5, name="plain")
    run.log(4, loss=0.5, accuracy=0.9)
    saved = covshift.load(run.save(tmp_path / "saved"))
    pd.testing.assert_frame_equal(saved.stats(), run.stats())
    assert saved.meta["config"]["every"] == 1 and saved.name == "plain"
    assert saved.meta["versions"]["torch"] == torch.__version__
    pd.testing.assert_frame_equal(saved.layers, run.layers)
    assert saved.curves().to_dict("records") == [{"step": 4, "loss": 0.5, "accuracy": 0.9}]


def test_store_streams_parts_while_training(tmp_path):
    model = mlp()
    tracker = covshift.attach(model, every=1, store=tmp_path / "run", flush_every=2)
    for _ in range(7):
        model(torch.randn(8, 4))
    parts = sorted(p.name for p in (tmp_path / "run").glob("part-*.parquet"))
    assert len(parts) == 3  # steps 0-1, 2-3 and 4-5 written; step 6 still buffered
    assert sorted(covshift.load(tmp_path / "run").stats().step.unique()) == list(range(6))
    tracker.detach()
    assert sorted(covshift.load(tmp_path / "run").stats().step.unique()) == list(range(7))


def test_default_run_name_is_the_store_directory(tmp_path):
    assert record_steps(mlp(), 1, store=tmp_path / "bn-run").name == "bn-run"


def test_store_refuses_to_overwrite_a_run(tmp_path):
    record_steps(mlp(), 1, store=tmp_path / "run")
    with pytest.raises(FileExistsError, match="already holds a covshift run"):
        covshift.attach(mlp(), store=tmp_path / "run")


def test_save_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        record_steps(mlp(), 1).save(tmp_path / "busy")


def test_loaded_run_is_read_only(tmp_path):
    loaded = covshift.load(record_steps(mlp(), 1).save(tmp_path / "r"))
    with pytest.raises(RuntimeError, match="read-only"):
        loaded.log(0, loss=1.0)


def test_unknown_source_is_rejected():
    with pytest.raises(ValueError, match=r"source must be one of .*'probe_a'.*got 'valid'"):
        record_steps(mlp(), 1).stats("valid")


def test_missing_directory_and_missing_meta_name_the_path(tmp_path):
    with pytest.raises(RunFileError, match=f"no run at {tmp_path / 'nope'}: the directory does not exist"):
        covshift.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFileError, match=r"empty/meta.json is missing"):
        covshift.load(tmp_path / "empty")


def test_corrupted_files_name_the_file_and_the_problem(tmp_path):
    path = record_steps(mlp(), 2).save(tmp_path / "r")
    part = next(path.glob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(RunFileError, match=rf"{part.name} is corrupted: its footer does not match the run's manifest"):
        covshift.load(path).stats()
    (path / "meta.json").write_text("{not json")
    with pytest.raises(RunFileError, match=r"meta.json is corrupted: not valid JSON"):
        covshift.load(path)
    (path / "meta.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(RunFileError, match="is not covshift run metadata"):
        covshift.load(path)


def test_curves_drop_a_line_cut_short_by_a_crash(tmp_path):
    run = record_steps(mlp(), 1, store=tmp_path / "r")
    run.log(0, loss=2.0)
    with open(tmp_path / "r" / "curves.jsonl", "a") as handle:
        handle.write('{"step": 1, "lo')
    assert covshift.load(tmp_path / "r").curves()["loss"].tolist() == [2.0]


def test_memory_stays_flat_over_thousands_of_steps():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(32, 16)
    tracker = covshift.attach(model, every=1, flush_every=50)
    with torch.no_grad():
        for _ in range(200):
            model(x)
        tracemalloc.start()
        for _ in range(300):
            model(x)
        early, _ = tracemalloc.get_traced_memory()
        for _ in range(2500):
            model(x)
        late, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert late - early < 256 * 1024  # 2,500 more steps of 2 layers add no per-step memory
    stats = tracker.detach().stats()
    assert stats.step.nunique() == 3000


@pytest.mark.parametrize(("budget", "parts"), [(10**9, 0), (50_000, 3), (1, 10)])
def test_memory_budget_triggers_flush(tmp_path, budget, parts):
    """A step's record of 64 channels takes 21,248 bytes (7 float64 stats, 69 float32 quantiles and bin means)."""
    model = nn.Sequential(nn.Linear(64, 8))
    tracker = covshift.attach(model, every=1, store=tmp_path / "r", flush_every=10**6, memory_budget=budget)
    for _ in range(10):
        model(torch.randn(2048, 64))
    assert len(list((tmp_path / "r").glob("part-*.parquet"))) == parts
    assert tracker.detach().stats().step.nunique() == 10


TRAINER = textwrap.dedent(
    """
    import sys, torch, covshift
    from torch import nn
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    tracker = covshift.attach(model, every=1, store=sys.argv[1], flush_every=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = 0
    while True:
        model(torch.randn(16, 1, 8, 8)).sum().backward()
        optimizer.step(); optimizer.zero_grad()
        if step >= 1:  # flush_every=1: steps up to step-1 are on disk once step's forward ends
            print(step - 1, flush=True)
        step += 1
    """
)


def start_trainer(script, store, **kwargs):
    """Run ``script`` in a new Python that imports the covshift under test, not another installed one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(covshift.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(script), str(store)], stdout=subprocess.PIPE, text=True, env=env, **kwargs)


@pytest.mark.parametrize("delay", [0.3, 0.77, 1.5])
def test_sigkill_mid_training_leaves_every_flushed_step(tmp_path, delay):
    script = tmp_path / "train.py"
    script.write_text(TRAINER)
    store = tmp_path / "run"
    proc = start_trainer(script, store)
    try:
        flushed = int(proc.stdout.readline())  # training is under way
        time.sleep(delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate()
    lines = rest.split()
    flushed = int(lines[-2]) if len(lines) >= 2 else flushed  # the last line may be cut short
    stats = covshift.load(store).stats()
    steps = sorted(stats.step.unique())
    assert steps[: flushed + 1] == list(range(flushed + 1))
    assert steps == list(range(len(steps)))
    assert (stats.groupby("step").size() == 1 + 4 + 64).all()  # every stored step is complete


def test_stats_is_cached_but_callers_cannot_corrupt_it(tmp_path):
    model = mlp()
    tracker = covshift.attach(model, every=1, store=tmp_path / "r", flush_every=1)
    model(torch.randn(8, 4))
    first = tracker.run.stats("train")
    original = first["mean"].copy()
    first["mean"] *= 100
    first.loc[0, "max"] = -1.0
    again = tracker.run.stats("train")
    pd.testing.assert_series_equal(again["mean"], original)
    assert again.loc[0, "max"] != -1.0
    model(torch.randn(8, 4))  # a new step reaches the cache
    assert sorted(tracker.run.stats("train").step.unique()) == [0, 1]
    tracker.detach()


INTERRUPTED_TRAINER = textwrap.dedent(
    """
    import sys, torch, covshift
    from torch import nn
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with covshift.attach(model, every=1, store=sys.argv[1], flush_every=1):
        step = 0
        while True:
            model(torch.randn(16, 1, 8, 8)).sum().backward()
            optimizer.step(); optimizer.zero_grad()
            if step >= 1:  # flush_every=1: steps up to step-1 are on disk once step's forward ends
                print(step - 1, flush=True)
            step += 1
    """
)


@pytest.mark.parametrize("delay", [0.2, 0.55, 1.1])
def test_ctrl_c_mid_training_stores_every_step_once(tmp_path, delay):
    script = tmp_path / "train.py"
    script.write_text(INTERRUPTED_TRAINER)
    store = tmp_path / "run"
    proc = start_trainer(script, store, stderr=subprocess.PIPE)
    try:
        flushed = int(proc.stdout.readline())
        time.sleep(delay)
    finally:
        os.kill(proc.pid, signal.SIGINT)
        rest, errors = proc.communicate(timeout=60)
    assert "KeyboardInterrupt" in errors
    flushed = int(rest.split()[-1]) if rest.split() else flushed
    stats = covshift.load(store).stats()
    assert not stats.duplicated(["step", "source", "layer", "channel"]).any()
    steps = sorted(stats.step.unique())
    assert steps == list(range(len(steps))) and len(steps) > flushed
    assert (stats.groupby("step").size() == 1 + 4 + 64).all()
