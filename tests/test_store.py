"""Store hardening: interrupted flushes, racing writers, files covshift did not write, bit rot, full disks."""

import errno
import functools
import json
import multiprocessing
import os
import shutil
import sys
import threading
import warnings

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import covshift
import covshift.store.manifest  # noqa: F401 - traced below
from covshift.store import files as store
from covshift.cli import main
from covshift.store.run import Run
from covshift.store.files import RunFileError, StoreWarning


def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def record(directory, steps=4, **kwargs):
    torch.manual_seed(0)
    model = mlp()
    tracker = covshift.attach(model, every=1, store=directory, **kwargs)
    for _ in range(steps):
        model(torch.randn(8, 4))
    return tracker.detach()


def steps_on_disk(directory):
    """Steps of every part file, read directly (no checks): duplicates show as repeated steps."""
    steps = []
    for path in directory.glob("part-*.parquet"):
        steps += sorted(set(pq.read_table(path)["step"].to_pylist()))
    return steps


def assert_clean(directory, must_hold, may_hold):
    """A loadable run with no duplicate record, no temporary file, every step of ``must_hold`` and only whole steps."""
    stats = covshift.load(directory).stats()
    assert not stats.duplicated(["step", "source", "layer", "channel"]).any()
    assert set(must_hold) <= set(stats.step) <= set(may_hold)
    assert (stats.groupby("step").size() == 4 + 6).all()  # every stored step is whole
    assert not list(directory.glob(".*.tmp"))


# -- 1. Ctrl-C inside a flush ---------------------------------------------------------


def test_ctrl_c_after_the_part_is_in_place_does_not_write_the_steps_twice(tmp_path, monkeypatch):
    real_write_part = store.write_part

    def write_then_interrupt(*args, **kwargs):
        real_write_part(*args, **kwargs)
        monkeypatch.setattr(store, "write_part", real_write_part)
        raise KeyboardInterrupt  # the part is renamed into place, the buffer not yet cleared

    model = mlp()
    with pytest.raises(KeyboardInterrupt), covshift.attach(model, every=1, store=tmp_path / "r", flush_every=2):
        model(torch.randn(8, 4))
        monkeypatch.setattr(store, "write_part", write_then_interrupt)
        model(torch.randn(8, 4))
    assert sorted(steps_on_disk(tmp_path / "r")) == [0, 1]
    assert_clean(tmp_path / "r", must_hold=[0, 1], may_hold=[0, 1])


_TRACED = tuple(sys.modules[f"covshift.store.{name}"].__file__ for name in ("files", "run", "writer", "manifest"))


class _InterruptAt:
    """A tracer that raises KeyboardInterrupt at the ``n``-th line run in the store's files, run, writer and manifest.

    Lines building the table (covshift/records.py) are not traced: an interrupt there is one before the write.
    """

    def __init__(self, n):
        self.n, self.count, self.fired, self.on_disk = n, 0, False, None

    def __call__(self, frame, event, arg):
        code = frame.f_code
        return self._local if code.co_filename in _TRACED else None

    def _local(self, frame, event, arg):
        if event == "line":
            self.count += 1
            if self.count == self.n:
                self.fired = True
                self.on_disk = steps_on_disk(self.directory)
                raise KeyboardInterrupt
        return self._local

    def run(self, directory, action):
        self.directory = directory
        sys.settrace(self)
        try:
            action()
        finally:
            sys.settrace(None)


@pytest.mark.parametrize("where", ["end of a step", "end of a step, training goes on", "detach"])
def test_ctrl_c_at_any_line_of_a_flush_loses_no_flushed_step_and_duplicates_none(tmp_path, where):
    interrupted = 0
    for n in range(1, 10_000):
        directory = tmp_path / f"r{n}"
        model = mlp()
        tracker = covshift.attach(model, every=1, store=directory, flush_every=2)
        for _ in range(3):
            model(torch.randn(8, 4))  # steps 0-1 on disk, step 2 buffered
        interrupt = _InterruptAt(n)
        step_3 = functools.partial(model, torch.randn(8, 4))  # its end flushes steps 2-3
        try:
            interrupt.run(directory, tracker.detach if where == "detach" else step_3)
        except KeyboardInterrupt:
            pass
        if where == "end of a step, training goes on":
            for _ in range(2):
                model(torch.randn(8, 4))
        tracker.detach()  # as the with block does on the way out
        if not interrupt.fired:
            break
        interrupted += 1
        last = 5 if where == "end of a step, training goes on" else 3
        assert_clean(directory, must_hold={0, 1, 2, *interrupt.on_disk, *range(4, last + 1)}, may_hold=range(last + 1))
        assert sorted(steps_on_disk(directory)) == sorted(set(steps_on_disk(directory)))
        shutil.rmtree(directory)
    assert interrupted > 30  # every line of the flush was tried


# -- 2. Two writers starting in one directory -------------------------------------------


def _start_run(directory, barrier, results):
    barrier.wait()
    try:
        Run(directory, {"name": str(os.getpid())})
        results.put("won")
    except FileExistsError as err:
        results.put(str(err))


def test_of_two_processes_starting_a_run_at_once_exactly_one_wins(tmp_path):
    context = multiprocessing.get_context("fork")
    for trial in range(20):
        directory = tmp_path / f"r{trial}"
        barrier, results = context.Barrier(2), context.Queue()
        procs = [context.Process(target=_start_run, args=(directory, barrier, results)) for _ in range(2)]
        for proc in procs:
            proc.start()
        outcomes = sorted(results.get(timeout=60) for _ in procs)
        for proc in procs:
            proc.join()
        assert outcomes[1] == "won" and "already holds a covshift run" in outcomes[0], outcomes


def _start_run_in_thread(directory, barrier, outcomes):
    barrier.wait()
    try:
        Run(directory, {})
        outcomes.append("won")
    except FileExistsError:
        outcomes.append("lost")


def test_of_threads_starting_a_run_at_once_exactly_one_wins(tmp_path):
    for trial in range(50):
        barrier, outcomes = threading.Barrier(4), []
        args = (tmp_path / f"r{trial}", barrier, outcomes)
        threads = [threading.Thread(target=_start_run_in_thread, args=args) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == ["lost"] * 3 + ["won"]


def test_a_run_created_after_the_check_is_not_taken_over(tmp_path, monkeypatch):
    """Deterministic: another process creates its run in the directory just after this one looked."""
    directory = tmp_path / "r"
    real_mkdir, others = type(directory).mkdir, []

    def mkdir_then_other_run(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if self == directory and not others:
            others.append("other")
            Run(directory, {"name": "other"})

    monkeypatch.setattr(type(directory), "mkdir", mkdir_then_other_run)
    with pytest.raises(FileExistsError, match="already holds a covshift run"):
        Run(directory, {"name": "mine"})
    assert json.loads((directory / "meta.json").read_text())["name"] == "other"


# -- 3, 4. Files covshift did not write -------------------------------------------------


@pytest.mark.parametrize("name", ["part-000002.parquet", "curves.jsonl"])
def test_a_directory_with_files_of_covshift_names_is_refused(tmp_path, name):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / name).write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=rf"already holds {name}, which this run did not write"):
        covshift.attach(mlp(), store=tmp_path / "r")
    assert (tmp_path / "r" / name).read_bytes() == b"mine"
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [name]


def test_a_part_dropped_in_while_training_is_neither_overwritten_nor_loaded(tmp_path):
    other = record(tmp_path / "other", flush_every=1)
    model = mlp()
    tracker = covshift.attach(model, every=1, store=tmp_path / "r", flush_every=2)
    model(torch.randn(8, 4))
    strays = {}  # each part of the other run, under its own name and under format 1's names
    for index, path in enumerate(store.part_paths(other.directory)):
        for name in (path.name, f"part-{index:06d}.parquet"):
            shutil.copy(path, tmp_path / "r" / name)
            strays[tmp_path / "r" / name] = path.read_bytes()
    for _ in range(5):
        model(torch.randn(8, 4))
    run = tracker.detach()
    assert all(stray.read_bytes() == data for stray, data in strays.items())
    own = [p for p in store.part_paths(run.directory) if p not in strays]
    assert sorted(s for p in own for s in set(pq.read_table(p)["step"].to_pylist())) == list(range(6))
    with pytest.raises(RunFileError, match=r"part-.*\.parquet belongs to .*not written by this run"):
        covshift.load(run.directory).stats()


def test_a_curves_file_created_by_someone_else_after_attach_is_not_appended_to(tmp_path):
    run = record(tmp_path / "r", steps=1)
    (tmp_path / "r" / "curves.jsonl").write_text("user's own\n")
    with pytest.warns(StoreWarning, match="curves.jsonl was not written by this run"):
        run.log(0, loss=1.0)
    run.log(1, loss=0.5)
    assert (tmp_path / "r" / "curves.jsonl").read_text() == "user's own\n"


def test_curves_created_by_the_run_are_appended_to(tmp_path):
    run = record(tmp_path / "r", steps=1)
    run.log(0, loss=1.0)
    run.log(1, loss=0.5)
    assert covshift.load(tmp_path / "r").curves()["loss"].tolist() == [1.0, 0.5]


# -- 5. Bit rot --------------------------------------------------------------------------


def test_a_flipped_bit_in_the_pages_of_a_part_never_gives_different_values(tmp_path):
    record(tmp_path / "r", steps=2, flush_every=10)
    (part,) = store.part_paths(tmp_path / "r")
    original = covshift.load(tmp_path / "r").stats()
    data = part.read_bytes()
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    caught = same = 0
    for position in range(4, footer, 9):  # every page: headers, dictionaries and values
        flipped = bytearray(data)
        flipped[position] ^= 1 << (position % 8)
        part.write_bytes(bytes(flipped))
        try:
            stats = covshift.load(tmp_path / "r").stats()
        except RunFileError as err:
            assert part.name in str(err)
            caught += 1
            continue
        pd.testing.assert_frame_equal(stats, original)
        same += 1
    assert caught > footer // 9 // 2 and same > 0  # bits in values, checked, and bits in unused header fields


def test_a_corrupted_data_page_is_named(tmp_path):
    record(tmp_path / "r", steps=2, flush_every=10)
    (part,) = store.part_paths(tmp_path / "r")
    meta = pq.ParquetFile(part).metadata.row_group(0).column(5)  # "mean": float64 values, plain encoded
    data = bytearray(part.read_bytes())
    data[meta.data_page_offset + meta.total_compressed_size - 3] ^= 0x10
    part.write_bytes(bytes(data))
    with pytest.raises(RunFileError, match=rf"{part.name} is corrupted"):
        covshift.load(tmp_path / "r").stats()


def test_a_part_with_fewer_rows_than_written_is_named(tmp_path):
    """A flipped bit in the footer's row count cuts a part short: the count written in its metadata disagrees."""
    record(tmp_path / "r", steps=2)
    (part,) = store.part_paths(tmp_path / "r")
    table = pq.read_table(part)
    pq.write_table(table.slice(0, 7), part)
    with pytest.raises(RunFileError, match=rf"{part.name} is corrupted: its footer does not match the run's manifest"):
        covshift.load(tmp_path / "r").stats()
    _without_manifest(tmp_path / "r")  # a run written before manifests: the row count in the part's metadata
    with pytest.raises(RunFileError, match=rf"{part.name} is corrupted: it holds 7 rows, {table.num_rows} were written"):
        covshift.load(tmp_path / "r").stats()


def _without_manifest(directory):
    """The run as covshift wrote it before manifests (format 3)."""
    (directory / "manifest.json").unlink()
    meta = json.loads((directory / "meta.json").read_text())
    meta["format_version"] = 3
    (directory / "meta.json").write_text(json.dumps(meta))


# -- 6. Files of the wrong shape, parts of other runs, format 1 ----------------------------


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda meta: meta.pop("layers"), "layers must be a list"),
        (lambda meta: meta.update(layers=[{"name": "fc"}]), r"layers\[0\] must have a name, type"),
        (lambda meta: meta.update(format_version="1"), "format_version must be a positive integer, got '1'"),
        (lambda meta: meta.pop("run_id"), "run_id must be a string"),
    ],
)
def test_meta_with_missing_or_wrong_fields_is_named(tmp_path, change, problem):
    record(tmp_path / "r", steps=1)
    path = tmp_path / "r" / "meta.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(RunFileError, match=rf"{path} is corrupted: {problem}"):
        covshift.load(tmp_path / "r")


def test_a_newer_format_asks_for_an_upgrade_whatever_its_fields(tmp_path):
    record(tmp_path / "r", steps=1)
    path = tmp_path / "r" / "meta.json"
    meta = json.loads(path.read_text())
    meta.update(format_version=store.FORMAT_VERSION + 1, layers={"fc": {}})
    path.write_text(json.dumps(meta))
    with pytest.raises(RunFileError, match=f"has format version {store.FORMAT_VERSION + 1}; this covshift reads up to {store.FORMAT_VERSION}: upgrade"):
        covshift.load(tmp_path / "r")


def test_a_part_with_foreign_columns_is_named(tmp_path):
    record(tmp_path / "r", steps=1)
    (part,) = store.part_paths(tmp_path / "r")
    table = pq.read_table(part)
    table = table.drop_columns(["mean"]).append_column("extra", table["var"])
    pq.write_table(table, part)
    with pytest.raises(RunFileError, match=rf"{part.name} is corrupted: its footer does not match"):
        covshift.load(tmp_path / "r").stats()
    _without_manifest(tmp_path / "r")
    with pytest.raises(RunFileError, match=rf"{part} does not hold covshift records: missing columns \['mean'\], unexpected columns \['extra'\]"):
        covshift.load(tmp_path / "r").stats()


def test_a_part_of_another_run_is_named_not_duplicated(tmp_path):
    record(tmp_path / "a", steps=2)
    record(tmp_path / "b", steps=2)
    (stray,) = store.part_paths(tmp_path / "b")
    shutil.copy(stray, tmp_path / "a" / stray.name)
    run_b = json.loads((tmp_path / "b" / "meta.json").read_text())["run_id"]
    with pytest.raises(RunFileError, match=rf"{stray.name} belongs to run {run_b}, not to this run"):
        covshift.load(tmp_path / "a").stats()


def test_each_part_is_tagged_with_the_run_id_of_meta(tmp_path):
    run = record(tmp_path / "r", steps=4, flush_every=2)
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta["format_version"] == store.FORMAT_VERSION == 4 and meta["run_id"] == run.meta["run_id"]
    parts = store.part_paths(tmp_path / "r")
    assert len(parts) == 2
    assert {pq.read_schema(p).metadata[b"covshift.run_id"].decode() for p in parts} == {meta["run_id"]}


def _as_format_1(directory):
    """Rewrite a run as covshift wrote format 1: untagged parts numbered from 0, no run id."""
    (directory / "manifest.json").unlink()
    meta = json.loads((directory / "meta.json").read_text())
    del meta["run_id"]
    meta["format_version"] = 1
    (directory / "meta.json").write_text(json.dumps(meta))
    for index, part in enumerate(store.part_paths(directory)):
        table = pq.read_table(part).replace_schema_metadata(None)
        part.unlink()
        pq.write_table(table, directory / f"part-{index:06d}.parquet", use_dictionary=["source", "layer"])


def test_format_1_runs_still_load(tmp_path):
    original = record(tmp_path / "r", steps=4, flush_every=2).stats()
    _as_format_1(tmp_path / "r")
    pd.testing.assert_frame_equal(covshift.load(tmp_path / "r").stats(), original)
    record(tmp_path / "new", steps=1)
    (tagged,) = store.part_paths(tmp_path / "new")
    shutil.copy(tagged, tmp_path / "r" / tagged.name)
    with pytest.raises(RunFileError, match="belongs to run .*, not to this run \\(untagged\\)"):
        covshift.load(tmp_path / "r").stats()


# -- 7. Disk full ----------------------------------------------------------------------------


class _FullDisk:
    """``os.fsync`` failing with ENOSPC for files in ``directory`` while ``full`` is set."""

    def __init__(self, monkeypatch, directory):
        self.full, self.directory, self.real = False, directory, os.fsync
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd):
        if self.full and self._in_directory(os.fstat(fd)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.real(fd)

    def _in_directory(self, stat):
        paths = [self.directory, *self.directory.iterdir()] if self.directory.exists() else []
        return any(os.path.samestat(stat, path.stat()) for path in paths)


def _step_bytes():
    """Bytes one step of ``mlp()`` takes in the buffer."""
    model = mlp()
    tracker = covshift.attach(model, every=1, flush_every=10**6)
    model(torch.randn(8, 4))
    return tracker.run._pending_bytes


def test_a_full_disk_warns_once_keeps_the_steps_and_writes_them_when_space_returns(tmp_path, monkeypatch):
    directory = tmp_path / "r"
    disk = _FullDisk(monkeypatch, directory)
    model = mlp()
    tracker = covshift.attach(model, every=1, store=directory, flush_every=2)
    for _ in range(2):
        model(torch.randn(8, 4))
    disk.full = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            model(torch.randn(8, 4))  # never raises
        tracker.run.log(7, loss=1.0)
    messages = [str(w.message) for w in caught if issubclass(w.category, StoreWarning)]
    assert len(messages) == 1, messages
    assert str(directory) in messages[0] and "no space left on device" in messages[0].lower()
    assert not list(directory.glob(".*.tmp"))
    assert sorted(set(covshift.load(directory).stats().step)) == [0, 1]
    disk.full = False
    for _ in range(2):
        model(torch.randn(8, 4))
    tracker.run.log(9, loss=0.5)
    tracker.detach()
    assert_clean(directory, must_hold=range(10), may_hold=range(10))
    assert covshift.load(directory).curves().to_dict("records") == [{"step": 9, "loss": 0.5}]


def test_a_disk_that_stays_full_drops_the_oldest_steps_beyond_the_budget(tmp_path, monkeypatch):
    directory = tmp_path / "r"
    disk = _FullDisk(monkeypatch, directory)
    model = mlp()
    tracker = covshift.attach(model, every=1, store=directory, flush_every=2, memory_budget=3 * _step_bytes())
    for _ in range(2):
        model(torch.randn(8, 4))
    disk.full = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(10):
            model(torch.randn(8, 4))
        run = tracker.detach()  # never raises
    messages = [str(w.message) for w in caught if issubclass(w.category, StoreWarning)]
    assert len(messages) == 2, messages
    assert "no space left on device" in messages[0].lower()
    assert str(directory) in messages[1] and "dropped the oldest 1 step," in messages[1]
    assert not list(directory.glob(".*.tmp"))
    assert_clean(directory, must_hold=[0, 1], may_hold=[0, 1])
    saved = run.save(tmp_path / "elsewhere")  # the steps still in memory go to the copy
    assert sorted(set(covshift.load(saved).stats().step)) == [0, 1, 9, 10, 11]
    disk.full = False
    with pytest.warns(StoreWarning, match=r"takes writes again; 7 steps .* were dropped"):
        run.flush()
    assert_clean(directory, must_hold=[0, 1, 9, 10, 11], may_hold=[0, 1, 9, 10, 11])


def test_write_atomic_leaves_no_temporary_file_when_the_write_fails(tmp_path, monkeypatch):
    disk = _FullDisk(monkeypatch, tmp_path)
    disk.full = True
    with pytest.raises(OSError, match="No space left on device"):
        store.write_atomic(tmp_path / "f", b"data")
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_names_a_broken_meta_without_a_traceback(tmp_path, capsys):
    record(tmp_path / "r", steps=1)
    path = tmp_path / "r" / "meta.json"
    meta = json.loads(path.read_text())
    del meta["layers"]
    path.write_text(json.dumps(meta))
    assert main(["stats", str(tmp_path / "r")]) == 1
    assert f"{path} is corrupted: layers must be a list" in capsys.readouterr().err


# -- 8. Values no covshift writes: an every of 0, steps out of range, a meta.json that is a directory ----------


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"every": 0, "schedule": {"kind": "every", "every": 0}}, "every must be a positive int, got 0"),
        ({"every": 0}, "every must be a positive int, got 0"),  # a run written before schedules were stored
        ({"schedule": {"kind": "log", "per_decade": -1}}, "per_decade must be a positive int, got -1"),
    ],
)
def test_meta_with_a_schedule_no_run_could_have_is_named(tmp_path, config, problem):
    record(tmp_path / "r", steps=2)
    path = tmp_path / "r" / "meta.json"
    meta = json.loads(path.read_text())
    meta["config"].pop("schedule")
    meta["config"].update(config)
    path.write_text(json.dumps(meta))
    with pytest.raises(RunFileError, match=rf"{path} is corrupted: .*{problem}"):
        covshift.report(tmp_path / "r", tmp_path / "report")
    assert main(["report", str(tmp_path / "r"), "-o", str(tmp_path / "report")]) == 1


def test_meta_json_that_is_a_directory_is_named(tmp_path):
    (tmp_path / "r" / "meta.json").mkdir(parents=True)
    with pytest.raises(RunFileError, match=r"meta.json is not a regular file \(a directory\)"):
        covshift.load(tmp_path / "r")


def _with_steps_moved(directory, offset, with_manifest):
    """The run's part rewritten (a valid part, its footer in the manifest) with every step moved by ``offset``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from covshift.store import manifest

    run_id = json.loads((directory / "meta.json").read_text())["run_id"]
    (part,) = store.part_paths(directory)
    table = pq.read_table(part).replace_schema_metadata(None)
    table = table.set_column(0, "step", pc.add(table["step"], pa.scalar(offset, pa.int64())))
    footer, groups = store.write_part(part, table, run_id)
    if with_manifest:
        manifest.write(directory, run_id, [manifest.describe(part.name, footer, groups, table, (0, 1))])
    else:
        _without_manifest(directory)
    return part


@pytest.mark.parametrize("offset", [-5, 2**62])
@pytest.mark.parametrize("with_manifest", [True, False])
def test_a_part_with_steps_no_run_could_record_is_named(tmp_path, offset, with_manifest):
    record(tmp_path / "r", steps=2)
    part = _with_steps_moved(tmp_path / "r", offset, with_manifest)
    with pytest.raises(RunFileError, match=rf"{part.name} is corrupted: it holds step -?\d+, outside 0 … 2\^53 - 1"):
        covshift.load(tmp_path / "r").stats()


def test_a_step_index_no_run_could_store_is_refused_at_the_call():
    tracker = covshift.attach(mlp(), every=1)
    for index in (2**63, 2**53, -1):
        with pytest.raises(ValueError, match=r"index must be an int from 0 to 2\^53 - 1"):
            tracker.set_step(index)
    tracker.set_step(2**53 - 1)
    tracker.detach()
