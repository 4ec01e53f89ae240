"""Several processes (torch.distributed, gloo on the CPU): one run, the union over ranks, written once.

Each scenario runs two ranks, with ``torch.multiprocessing`` and with a real
``torchrun``, and compares the stored run with one process that saw every
rank's batches. Every multi-process test has a hard deadline: a hang fails it.

This file is also the script torchrun runs: ``python tests/test_distributed.py OUT SCENARIO``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import covshift
from covshift.store import files as store

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
BATCH = 4  # per rank
STEPS = 3
#: Hard limit on one two-process scenario, imports included (the CI machine has two shared cores).
DEADLINE = 150
#: The process group's timeout in the workers: a collective that waits longer fails.
PG_TIMEOUT = timedelta(seconds=20)


# -- the workers ----------------------------------------------------------------------
def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Each step's global batch (every rank's slices): inputs (STEPS, WORLD*BATCH, 2, 5, 5) and labels."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, WORLD * BATCH, 2, 5, 5, generator=gen)
    return x, torch.randint(0, 4, (STEPS, WORLD * BATCH), generator=gen)


def _train(model: nn.Module, net: nn.Module, rank: int, out: Path, *, per_forward: bool) -> None:
    """A few SGD steps of ``net`` (DDP or not) on this rank's slices, covshift attached to ``model``.

    Training is recorded every 2nd step, the probe (each rank its slice of one fixed batch) every step:
    step 1 exchanges probe records alone.
    """
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    xs, ys = _data()
    probe = torch.randn(WORLD * BATCH, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    local = slice(rank * BATCH, (rank + 1) * BATCH) if rank >= 0 else slice(None)
    kwargs = {} if per_forward else {"optimizer": opt}
    with covshift.attach(model, every=2, store=out / "run", **kwargs).probe(probe[local], every=1) as tracker:
        for x, y in zip(xs, ys):
            loss = nn.functional.cross_entropy(net(x[local]), y[local])
            loss.backward()
            opt.step()
            opt.zero_grad()
    (out / f"run-dir-{max(rank, 0)}.txt").write_text(str(tracker.run.directory))


def _gradients(rank: int, out: Path, compiled: bool = False) -> None:
    """Input gradients under DDP, its forward compiled or not (rank -1: one eager process on every rank's
    batches). The loss is a sum and the learning rate 0, so each example's input gradient is the same in one
    process as on its rank."""
    model = _model()
    net = model if rank < 0 else nn.parallel.DistributedDataParallel(model)
    if compiled:
        net = torch.compile(net, backend="aot_eager")
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    xs, ys = _data()
    local = slice(rank * BATCH, (rank + 1) * BATCH) if rank >= 0 else slice(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", covshift.faults.CovshiftWarning)  # layer '0': its input is the data
        with covshift.attach(model, every=1, store=out / "run", optimizer=opt, gradients=True):
            for x, y in zip(xs, ys):
                nn.functional.cross_entropy(net(x[local]), y[local], reduction="sum").backward()
                opt.step()
                opt.zero_grad()


def _uneven(rank: int, out: Path) -> None:
    """Rank r takes r+1 forwards per step, and only rank 1 calls the layer ``extra`` (rank -1: all of them)."""
    model = _model()
    extra = nn.Linear(4, 4)
    holder = nn.ModuleDict({"net": model, "extra": extra})
    opt = torch.optim.SGD(holder.parameters(), lr=0.1)
    xs, _ = _data()
    with covshift.attach(holder, every=1, store=out / "run", optimizer=opt):
        for x in xs:
            for r in ([rank] if rank >= 0 else range(WORLD)):
                for k in range(r + 1):
                    y = model(x[r * BATCH + k : r * BATCH + k + 2])
                    if r == 1:
                        extra(y)
            opt.step()


def _join(rank: int, out: Path) -> None:
    """Uneven batches: rank r has 3 + 2r steps' worth, under Join (rank -1: one process, every batch).

    The learning rate is 0, so the records depend on the data alone (under Join, DDP divides the
    gradients by the initial world size, which one process cannot mimic).
    """
    from torch.distributed.algorithms.join import Join

    model = _model()
    gen = torch.Generator().manual_seed(3)
    xs = torch.randn(5, WORLD * BATCH, 2, 5, 5, generator=gen)
    if rank < 0:
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with covshift.attach(model, every=1, store=out / "run", optimizer=opt):
            for step, x in enumerate(xs):
                model(x if step < 3 else x[BATCH:]).sum().backward()
                opt.step()
        return
    net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with covshift.attach(model, every=1, store=out / "run", optimizer=opt) as tracker, Join([net, tracker.joinable]):
        for x in xs[: 3 + 2 * rank]:
            net(x[rank * BATCH : (rank + 1) * BATCH]).sum().backward()
            opt.step()
            opt.zero_grad()


def _stops(rank: int, out: Path) -> None:
    """Rank 0's store fails at step 2 (per-forward steps): rank 0 stops recording, warns, and both train on."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, _ = _data()

    def broken(*args: object) -> None:
        raise OSError("disk full (on purpose)")

    with covshift.attach(model, every=1, store=out / "run") as tracker:
        for step in range(6):
            if rank == 0 and step == 2:
                tracker.run.append = broken
            model(xs[step % STEPS, :BATCH]).sum().backward()
            opt.step()
            opt.zero_grad()


def _capped_values(rank: int) -> torch.Tensor:
    """Rank ``rank``'s input: 2048 values per channel, 4 channels (more than sample_size in the whole job)."""
    return torch.randn(2048, 4, generator=torch.Generator().manual_seed(10 + rank))


def _capped(rank: int, out: Path) -> None:
    """One recorded forward per rank of 2048 values per channel with sample_size=1024: each rank sends 512."""
    from covshift.record.distributed import Ranks

    gather, widths = Ranks.gather, []

    def spy(self, *args, **kwargs):  # the sample widths rank 0 receives
        pooled = gather(self, *args, **kwargs)
        widths.extend(part.sample.shape[1] for parts in pooled.values() for part in parts)
        return pooled

    Ranks.gather = spy
    model = nn.Linear(4, 2)
    with covshift.attach(model, every=1, sample_size=1024, store=out / "run"):
        model(_capped_values(rank))
    (out / f"widths-{rank}.json").write_text(json.dumps(widths))


def _dies(rank: int, out: Path) -> None:
    """Rank 1 raises in its second step; rank 0 trains on (no DDP: covshift's exchange is the only collective)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, _ = _data()
    with covshift.attach(model, every=1, store=out / "run", optimizer=opt):
        for step in range(20):
            if rank == 1 and step == 1:
                raise RuntimeError("rank 1 fails on purpose")
            model(xs[step % STEPS, :BATCH]).sum().backward()
            opt.step()
            opt.zero_grad()


def _disagree(rank: int, out: Path, scenario: str) -> None:
    """The ranks attach differently (``every``, ``layers``, ``sample_size``) or, attached alike, number their steps
    differently (rank 1 skips a step number). No DDP: covshift's exchange is the only collective."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, _ = _data()
    options = {
        "every": {"every": 1 if rank == 0 else 2},
        "layers": {"layers": ["0", "3"] if rank == 0 else ["0"]},
        "sample_size": {"sample_size": 64 * (rank + 1)},
        "steps": {},
    }[scenario.removeprefix("disagree_")]
    options.setdefault("every", 1)
    with covshift.attach(model, store=out / "run", optimizer=opt, **options) as tracker:
        for step in range(6):
            if scenario == "disagree_steps" and rank == 1 and step == 3:
                tracker.set_step(tracker.current_step + 1)
            model(xs[step % STEPS, rank * BATCH : (rank + 1) * BATCH]).sum().backward()
            opt.step()
            opt.zero_grad()


def _resumed(rank: int, out: Path) -> None:
    """A job of 3 steps, then another that resumes its run (without set_step: rank 0's last step + 1, on every rank)."""
    xs, _ = _data()
    for session in range(2):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with covshift.attach(model, every=1, store=out / "run", optimizer=opt, resume=session == 1) as tracker:
            for step in range(STEPS):
                model(xs[step, rank * BATCH : (rank + 1) * BATCH]).sum().backward()
                opt.step()
                opt.zero_grad()
        (out / f"steps-{session}-{rank}.json").write_text(json.dumps(tracker.current_step))


def worker(rank: int, out: str, scenario: str, init_method: str | None) -> None:
    """One rank: run ``scenario``, write ``rank{rank}.json`` (error type and message, if any)."""
    out = Path(out)
    from jobs import start_rank

    start_rank(out, rank)
    result: dict = {"error": None}
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD, timeout=PG_TIMEOUT)
        if scenario in ("ddp", "ddp_forward", "ddp_compiled"):
            model = _model()
            net = nn.parallel.DistributedDataParallel(model)
            if scenario == "ddp_compiled":  # covshift's hooks inside the compiled DDP forward
                net = torch.compile(net, backend="aot_eager")
            _train(model, net, rank, out, per_forward=scenario == "ddp_forward")
            result["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        elif scenario == "fsdp":  # FSDP2: parameters sharded, every rank's activations whole
            from torch.distributed.fsdp import fully_shard

            model = _model()
            fully_shard(model)
            _train(model, model, rank, out, per_forward=False)
        elif scenario == "uneven":
            _uneven(rank, out)
        elif scenario in ("gradients", "gradients_compiled"):
            _gradients(rank, out, compiled=scenario == "gradients_compiled")
            result["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        elif scenario == "join":
            _join(rank, out)
        elif scenario == "capped":
            _capped(rank, out)
        elif scenario == "stops":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _stops(rank, out)
            result["warnings"] = [str(w.message) for w in caught]
        elif scenario == "dies":
            _dies(rank, out)
        elif scenario == "resumed":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _resumed(rank, out)
            result["warnings"] = [str(w.message) for w in caught if issubclass(w.category, covshift.faults.CovshiftWarning)]
        elif scenario.startswith("disagree_"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _disagree(rank, out, scenario)
            result["warnings"] = [str(w.message) for w in caught if issubclass(w.category, covshift.faults.CovshiftWarning)]
    except Exception as err:  # noqa: BLE001 - reported to the test through the file
        result = {"error": type(err).__name__, "message": str(err), "trace": traceback.format_exc()}
    result["elapsed"] = time.monotonic()
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized() and result["error"] is None:
        dist.destroy_process_group()
    # The result is on disk. Leave without the interpreter's teardown: gloo's threads sometimes abort it
    # ("terminate called without an active exception", about 1 run in 10 here), after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- running them ---------------------------------------------------------------------
def _spawn(out: Path, scenario: str) -> dict[int, dict]:
    """Both ranks with torch.multiprocessing; killed at DEADLINE."""
    import torch.multiprocessing as mp

    init = f"file://{out / 'rendezvous'}"
    context = mp.start_processes(worker, args=(str(out), scenario, init), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + DEADLINE
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"scenario {scenario!r} still running after {DEADLINE}s: a hang")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return _results(out)


def _torchrun(out: Path, scenario: str) -> dict[int, dict]:
    """Both ranks under a real ``torchrun --standalone --nproc_per_node=2``."""
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [*command, "--standalone", f"--nproc_per_node={WORLD}", __file__, str(out), scenario],
        check=False, env=env, capture_output=True, text=True, timeout=DEADLINE,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return _results(out)


def _results(out: Path) -> dict[int, dict]:
    return {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)}


def _ok(results: dict[int, dict]) -> None:
    for rank, result in results.items():
        assert result["error"] is None, f"rank {rank}: {result.get('trace')}"


def _single(out: Path, scenario: str) -> Path:
    """The same training in this process, on every rank's batches at once."""
    out.mkdir()
    if scenario == "uneven":
        _uneven(-1, out)
    elif scenario in ("gradients", "gradients_compiled"):
        _gradients(-1, out)
    elif scenario == "join":
        _join(-1, out)
    else:
        model = _model()
        _train(model, model, -1, out, per_forward=scenario == "ddp_forward")
    return out / "run"


def _same_run(distributed: Path, single: Path) -> None:
    got, want = covshift.load(distributed), covshift.load(single)
    # probe_a and probe_b are each rank's halves: the same values as one process's halves only in union
    a, b = (
        run.stats().query("source in ['train', 'probe']").sort_values(["step", "source", "layer", "channel"])
        .reset_index(drop=True)
        for run in (got, want)
    )
    assert len(a) == len(b) > 0
    for column in ("step", "layer", "channel", "count", "nonfinite"):
        assert (a[column].astype(str) == b[column].astype(str)).all(), column
    numbers = [c for c in a.columns if c not in ("step", "source", "layer", "channel")]
    torch.testing.assert_close(
        torch.tensor(a[numbers].to_numpy(dtype=float)), torch.tensor(b[numbers].to_numpy(dtype=float)),
        rtol=1e-5, atol=1e-5, equal_nan=True,
    )
    assert got.meta["layers"] == want.meta["layers"]
    assert got.meta["config"]["distributed"] == {"world_size": WORLD, "backend": "gloo"}


def _one_run_written(out: Path) -> None:
    """Only rank 0's run is in ``out`` (besides the workers' result files), and rank 1 wrote nothing anywhere:
    not in its temporary directory, and its run has no directory."""
    names = ("rank", "run-dir", "rendezvous", "tmp-")
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith(names))
    assert written == ["run"]
    assert (out / "run-dir-0.txt").read_text() == str(out / "run")
    assert (out / "run-dir-1.txt").read_text() == "None"
    assert list((out / "tmp-1").iterdir()) == []
    run_id, parts = covshift.load(out / "run").meta["run_id"], store.part_paths(out / "run")
    assert parts and all(run_id in part.name for part in parts)  # every part is rank 0's run's


@pytest.mark.parametrize("scenario", ["ddp", "ddp_forward", "fsdp", "ddp_compiled"])
def test_ddp_and_fsdp_run_equals_one_process_on_all_batches(tmp_path, scenario):
    if scenario == "fsdp" and not hasattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard"):
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    out = tmp_path / "job"
    out.mkdir()
    results = _spawn(out, scenario)
    _ok(results)
    if scenario == "ddp_compiled":
        assert all(result["graphs"] > 0 for result in results.values())  # the forwards ran compiled
    _one_run_written(out)
    _same_run(out / "run", _single(tmp_path / "single", scenario))
    stats = covshift.load(out / "run").stats()
    assert sorted(stats.query("source == 'train'")["step"].unique()) == [0, 2]
    # with optimizer steps the last update opens step 3, and its probe shows the final weights
    probed = [0, 1, 2] if scenario == "ddp_forward" else [0, 1, 2, 3]
    assert sorted(stats.query("source == 'probe'")["step"].unique()) == probed


@pytest.mark.parametrize("scenario", ["gradients", "gradients_compiled"])
def test_input_gradients_of_the_ranks_merge_into_the_records_of_one_process(tmp_path, scenario):
    out = tmp_path / "job"
    out.mkdir()
    results = _spawn(out, scenario)
    _ok(results)
    if scenario == "gradients_compiled":
        assert all(result["graphs"] > 0 for result in results.values())  # the forwards ran compiled
    got, want = (covshift.load(path).stats(source="grad").sort_values(["step", "layer", "channel"])
                 .reset_index(drop=True) for path in (out / "run", _single(tmp_path / "single", scenario)))
    assert sorted(got.step.unique()) == list(range(STEPS)) and set(got.layer) == {"3"}
    assert (got["count"] == WORLD * BATCH).all()
    numbers = [c for c in got.columns if c not in ("step", "source", "layer", "channel")]
    assert got[["step", "layer", "channel"]].equals(want[["step", "layer", "channel"]])
    torch.testing.assert_close(torch.tensor(got[numbers].to_numpy(dtype=float)),
                               torch.tensor(want[numbers].to_numpy(dtype=float)), rtol=1e-5, atol=1e-6, equal_nan=True)


def test_uneven_forwards_and_layers_per_rank_merge_without_deadlock(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    _ok(_spawn(out, "uneven"))
    _same_run(out / "run", _single(tmp_path / "single", "uneven"))


def test_uneven_batches_under_join_record_every_step_without_deadlock(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    _ok(_spawn(out, "join"))
    _same_run(out / "run", _single(tmp_path / "single", "join"))
    counts = covshift.load(out / "run").stats().query("layer == '0' and channel == 0")["count"].tolist()
    assert counts == [2 * BATCH * 25] * 3 + [BATCH * 25] * 2  # steps 3 and 4: rank 1's batches alone


def test_capped_samples_give_quantiles_within_the_sampling_error(tmp_path):
    """Each rank sends ceil(1024 / 2) of its 2048 values per channel: quantiles of the 1024 pooled values are
    within the sampling error of a 1024-value sample (docs/metrics.md), moments stay exact."""
    out = tmp_path / "job"
    out.mkdir()
    _ok(_spawn(out, "capped"))
    stats = covshift.load(out / "run").stats()
    values = torch.cat([_capped_values(rank) for rank in range(WORLD)]).double()
    assert stats["count"].tolist() == [2 * 2048] * 4
    torch.testing.assert_close(torch.tensor(stats["mean"].to_numpy()), values.mean(0))
    torch.testing.assert_close(torch.tensor(stats["var"].to_numpy()), values.var(0, unbiased=False))
    levels = [0.05, 0.25, 0.5, 0.75, 0.95]
    exact = torch.quantile(values, torch.tensor(levels, dtype=torch.float64), dim=0).T  # (channels, levels)
    stored = torch.tensor(stats[[f"q{level:g}" for level in levels]].to_numpy(dtype=float))
    # standard error of a sample quantile of 1024 values of N(0, 1): at most 0.07 here; allow 4 of them
    assert (stored - exact).abs().max() < 0.25
    assert json.loads((out / "widths-0.json").read_text()) == [512, 512]  # from each rank, 1024 in all


def test_a_rank_whose_store_fails_stops_recording_and_the_others_train_on(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    results = _spawn(out, "stops")
    _ok(results)
    assert any("disk full (on purpose)" in w and "stops recording" in w for w in results[0]["warnings"])
    assert sorted(covshift.load(out / "run").stats()["step"].unique()) == [0, 1]


def test_a_rank_that_dies_ends_the_other_with_an_error_not_a_hang(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    start = time.monotonic()
    results = _spawn(out, "dies")
    assert results[1]["error"] == "RuntimeError" and "on purpose" in results[1]["message"]
    assert results[0]["error"] == "DistributedError", results[0]
    assert "step 1" in results[0]["message"] and "rank has died" in results[0]["message"]
    assert time.monotonic() - start < DEADLINE
    assert covshift.load(out / "run").stats()["step"].unique().tolist() == [0]  # step 0 was merged and stored


@pytest.mark.parametrize(
    ("how", "said", "kept"),
    [
        ("every", r"every: rank 0 .*'every': 1.*rank 1 .*'every': 2", []),
        ("layers", r"layers: rank 0 \['0', '3'\], rank 1 \['0'\]", []),
        ("sample_size", r"sample_size: rank 0 64, rank 1 128", []),
        ("steps", r"step 3 on rank 0, step 4 on rank 1", [0, 1, 2]),
    ],
)
def test_ranks_that_disagree_warn_once_each_and_stop_recording_without_a_wrong_row(tmp_path, how, said, kept):
    """A difference in how the ranks record is found at the first exchange (or, for step numbers, at the
    exchange where they part): one warning on every rank, recording stops on every rank, no hang, and
    what rank 0 stored before holds both ranks' batches of the same steps."""
    import re

    out = tmp_path / "job"
    out.mkdir()
    results = _spawn(out, f"disagree_{how}")
    _ok(results)
    for rank, result in results.items():
        assert len(result["warnings"]) == 1, (rank, result["warnings"])
        assert re.search(said, result["warnings"][0]), result["warnings"][0]
        assert "recording stops on every rank" in result["warnings"][0]
    stats = covshift.load(out / "run").stats()
    assert sorted(stats.step.unique()) == kept
    conv = stats[(stats.layer == "0") & (stats.channel == 0)]
    assert (conv["count"] == WORLD * BATCH * 25).all()  # every stored row: both ranks' 4 images of 5×5


def test_a_resumed_job_goes_on_at_rank_0s_next_step_on_every_rank(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    results = _spawn(out, "resumed")
    _ok(results)
    assert all(result["warnings"] == [] for result in results.values())
    assert [json.loads((out / f"steps-1-{rank}.json").read_text()) for rank in range(WORLD)] == [2 * STEPS] * WORLD
    conv = covshift.load(out / "run").stats("train").query("layer == '0' and channel == 0")
    assert conv.step.tolist() == list(range(2 * STEPS)) and (conv["count"] == WORLD * BATCH * 25).all()


def test_torchrun_ddp_job_writes_one_run_equal_to_one_process(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    _ok(_torchrun(out, "ddp"))
    _one_run_written(out)
    _same_run(out / "run", _single(tmp_path / "single", "ddp"))


# -- without processes ----------------------------------------------------------------
def test_pack_unpack_round_trip_and_sample_cap():
    from covshift.record.distributed import _capped, _pack, _unpack
    from covshift.summary.summarize import Summarizer

    partial = Summarizer(64).summarize(torch.randn(10, 3, 4, 4), 1)
    capped = _capped(partial, 16)
    assert capped.sample.shape == (3, 16) and partial.sample.shape == (3, 64)
    wide = Summarizer(5).summarize(torch.randn(3, 7).double(), 1)
    for partial, dtype in ((capped, torch.float32), (wide, torch.float64)):
        flat = _pack([partial], torch.device("cpu"))
        channels, width = partial.sample.shape
        assert flat.dtype == torch.uint8 and flat.numel() == channels * (48 + width * dtype.itemsize)
        unaligned = torch.cat([torch.zeros(1, dtype=torch.uint8), flat])[1:]  # as at an odd offset of a gather
        back = _unpack(unaligned, channels, width, dtype)
        for field in ("count", "mean", "m2", "min", "max", "nonfinite", "sample"):
            torch.testing.assert_close(getattr(back, field), getattr(partial, field), rtol=0, atol=0)


def test_single_process_and_group_false_are_not_distributed():
    from covshift.record.distributed import detect

    assert detect() is None and detect(False) is None
    with pytest.raises(ValueError, match="init_process_group"):
        detect(object())


def test_a_non_writer_run_writes_nothing_and_says_where_the_records_are(tmp_path, monkeypatch):
    from covshift.record.distributed import NonWriterRun

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run = NonWriterRun({"name": None, "config": {"every": 1}}, rank=1, size=2, store="runs/job")
    assert isinstance(run, covshift.Run) and run.directory is None and run.meta["config"] == {"every": 1}
    run.flush()
    run.log(0, loss=1.0)  # a loop may log on every rank: rank 0 keeps the curves
    assert run.name == "rank 1 of 2" and "rank 1 of 2 writes nothing" in repr(run)
    for read in (lambda: run.stats(), lambda: run.layers, run.curves, lambda: run.save(tmp_path / "copy")):
        with pytest.raises(RuntimeError, match=r"rank 1 of 2 holds no records: rank 0 .* writes the run to runs/job"):
            read()
    # Every rank refuses the settings rank 0's run refuses, so no rank trains on alone into a collective.
    for setting in ("flush_every", "memory_budget", "sketch_channels"):
        with pytest.raises(ValueError, match=setting):
            NonWriterRun({}, rank=1, size=2, **{setting: 0})
        with pytest.raises(ValueError, match=setting):
            covshift.Run(tmp_path / "run", {}, **{setting: 0})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore::covshift.faults.CovshiftWarning")  # no step recorded: not the point here
def test_joinable_outside_a_distributed_job_says_why():
    model = _model()
    with covshift.attach(model) as tracker, pytest.raises(RuntimeError, match="no process group was found"):
        tracker.joinable  # noqa: B018


if __name__ == "__main__":  # one rank under torchrun
    worker(int(os.environ["RANK"]), sys.argv[1], sys.argv[2], None)
