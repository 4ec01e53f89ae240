"""Record schedules: which steps record, stored in meta, used for training and probes."""

import re

import numpy as np
import pytest
import torch

import covshift
from covshift.schedule import Every, LogSpaced, from_config, parse


def test_log_spaced_is_every_step_early_then_per_decade():
    schedule = LogSpaced(40)
    steps = schedule.steps(100_001)
    assert steps[:23] == list(range(23))  # dense where drift is fastest
    assert 23 not in steps and 24 in steps
    decade = [s for s in steps if 10_000 <= s < 100_000]
    assert len(decade) == 40
    ratios = [b / a for a, b in zip(decade, decade[1:])]
    assert all(abs(r - 10 ** (1 / 40)) < 1e-3 for r in ratios)  # evenly spaced in log(step)


@pytest.mark.parametrize("per_decade", [1, 7, 40, 100])
def test_records_agrees_with_the_list_of_steps(per_decade):
    schedule = LogSpaced(per_decade)
    listed = set(schedule.steps(200_000))
    assert [s for s in range(200_000) if schedule.records(s)] == sorted(listed)
    assert not schedule.records(-1)


def test_record_count_grows_with_the_log_of_the_run_length():
    schedule = LogSpaced()
    counts = [len(schedule.steps(10**k)) for k in range(3, 7)]
    assert counts == [88, 128, 168, 208]  # as the module and attach() docstrings say
    steps = [len(schedule.steps(10**k)) - len(schedule.steps(10 ** (k - 1))) for k in range(3, 7)]
    assert steps == [40, 40, 40, 40]


def test_every_n_and_parsing():
    assert Every(10).steps(35) == [0, 10, 20, 30]
    assert [s for s in range(35) if Every(10).records(s)] == [0, 10, 20, 30]
    assert parse(3) == Every(3) and parse("log") == LogSpaced() and parse(LogSpaced(5)) == LogSpaced(5)
    assert parse(np.int64(5)) == Every(5)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"every must be a positive int, got {bad}"):
            parse(bad)
    for bad in (1.5, True, "linear", None):
        with pytest.raises(ValueError, match=re.escape(f"every must be a positive int, 'log' or a covshift.schedule.Schedule, got {bad!r}")):
            parse(bad)
    with pytest.raises(ValueError, match="per_decade must be a positive int"):
        LogSpaced(0)


def test_schedule_round_trips_through_meta_and_older_runs_read_as_every():
    for schedule in (Every(7), LogSpaced(12)):
        assert from_config({"schedule": schedule.describe()}) == schedule
    assert from_config({"every": 10}) == Every(10)  # runs recorded before schedules existed


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def test_the_default_records_the_log_spaced_steps_and_stores_the_schedule(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = covshift.attach(model, optimizer=opt, store=tmp_path / "run")
    for _ in range(60):
        model(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    run = tracker.detach()
    recorded = sorted(run.stats(source="train")["step"].unique())
    assert recorded == LogSpaced().steps(60)
    meta = covshift.load(tmp_path / "run").meta["config"]
    assert meta["schedule"] == {"kind": "log", "per_decade": 40} and from_config(meta) == LogSpaced()


def test_probes_follow_the_recording_schedule_unless_given_their_own():
    model = _mlp()
    batch = torch.randn(8, 4)
    with covshift.attach(model, every=LogSpaced(2)) as tracker:
        tracker.probe(batch)
        for _ in range(40):
            model(torch.randn(16, 4))
    stats = tracker.run.stats()
    train = sorted(stats[stats.source == "train"].step.unique())
    assert train == [0, 1, 3, 10, 32] == LogSpaced(2).steps(40)
    assert sorted(stats[stats.source == "probe"].step.unique()) == train
    with covshift.attach(model, every=LogSpaced(2)) as tracker:
        tracker.probe(batch, every=20)
        for _ in range(40):
            model(torch.randn(16, 4))
    assert sorted(tracker.run.stats(source="probe").step.unique()) == [0, 20]


def test_log10_rounding_edges_are_consistent():
    """Points that sit within float error of a .5 boundary are decided the same way by both functions."""
    for per_decade in (3, 40):
        schedule = LogSpaced(per_decade)
        for k in range(0, 6 * per_decade):
            point = int(10 ** (k / per_decade) + 0.5)
            assert schedule.records(point), (per_decade, k, point)


class Primes(covshift.schedule.Schedule):
    """A user's own schedule that describes itself."""

    def records(self, step):
        return step in (0, 2, 3, 5, 7)

    def describe(self):
        return {"kind": "primes"}


class Undescribed(covshift.schedule.Schedule):
    """A user's own schedule with records() alone."""

    def records(self, step):
        return step % 3 == 0


@pytest.mark.parametrize("plan", [Primes(), Undescribed()])
def test_a_run_recorded_on_a_schedule_of_the_users_own_reports_from_python_and_the_command_line(tmp_path, plan):
    from covshift.cli import main

    model = _mlp()
    with covshift.attach(model, every=plan, store=tmp_path / "r"):
        for step in range(8):
            model(torch.randn(16, 4) + step)
    run = covshift.load(tmp_path / "r")
    assert sorted(run.stats().step.unique()) == [step for step in range(8) if plan.records(step)]
    stored = from_config(run.meta["config"])
    assert stored.describe() == run.meta["config"]["schedule"] and str(stored).startswith("a schedule of the user's own")
    assert covshift.report(run, tmp_path / "py", metrics="wasserstein").is_file()
    assert main(["report", str(tmp_path / "r"), "-o", str(tmp_path / "cli"), "--metric", "wasserstein"]) == 0
