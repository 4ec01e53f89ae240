"""The run's manifest: every part's footer is checked against it before pyarrow reads the footer.

A part's Parquet footer (its schema, row groups and their statistics) is not
covered by the page checksums: a changed layer name in it once made
``stats(layers=...)`` drop a layer's rows silently, and one flipped bit aborted
the process inside pyarrow. The manifest, written atomically at each flush,
holds per part its byte size, the CRC of its footer, its rows, layers, step
range and row groups; readers verify a footer against it before handing it to
pyarrow, and choose parts and row groups from it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import covshift
from covshift.store import files as store
from covshift.store import manifest
from covshift.store.files import RunFileError

ROOT = Path(__file__).resolve().parents[1]


def greek():
    return nn.Sequential(OrderedDict(alpha=nn.Linear(4, 6), relu=nn.ReLU(), omega=nn.Linear(6, 3)))


def record(directory, steps=16, flush_every=100, **kwargs):
    torch.manual_seed(0)
    model = greek()
    with covshift.attach(model, every=1, store=directory, flush_every=flush_every, **kwargs):
        for _ in range(steps):
            model(torch.randn(8, 4))
    return covshift.load(directory)


def footer_start(data: bytes) -> int:
    return len(data) - 8 - int.from_bytes(data[-8:-4], "little")


def test_a_layer_renamed_in_a_footer_is_named_not_dropped_from_filtered_reads(tmp_path):
    record(tmp_path / "r")
    (part,) = store.part_paths(tmp_path / "r")
    data = part.read_bytes()
    start = footer_start(data)
    assert data[start:].count(b"omega") == 1  # in the row group's statistics; the pages keep their checksums
    part.write_bytes(data[:start] + data[start:].replace(b"omega", b"alphz"))
    run = covshift.load(tmp_path / "r")
    for read in (lambda: run.stats(layers="omega"), run.stats, lambda: covshift.drift(run)):
        with pytest.raises(RunFileError, match=rf"{part.name}.*footer does not match"):
            read()


FLIPS = textwrap.dedent(
    """
    import sys, pandas as pd, covshift
    from pathlib import Path
    from covshift.store.files import RunFileError
    directory, part = Path(sys.argv[1]), Path(sys.argv[2])
    data = part.read_bytes()
    start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    original = covshift.load(directory)
    whole, omega = original.stats(), original.stats(layers="omega")
    caught = same = 0
    # every byte of the schema and the key columns' metadata (where a flip once aborted the process), then every 5th
    for position in [*range(start, start + 2048), *range(start + 2048, len(data), 5)]:
        flipped = bytearray(data)
        flipped[position] ^= 1 << (position % 8)
        part.write_bytes(bytes(flipped))
        run = covshift.load(directory)
        try:
            got = run.stats(layers="omega"), run.stats()
        except RunFileError as err:
            assert part.name in str(err), err
            caught += 1
            continue
        pd.testing.assert_frame_equal(got[0], omega)
        pd.testing.assert_frame_equal(got[1], whole)
        same += 1
    part.write_bytes(data)
    print(caught, same)
    """
)


def test_no_bit_flipped_in_a_footer_changes_a_read_or_aborts_the_process(tmp_path):
    record(tmp_path / "r")
    (part,) = store.part_paths(tmp_path / "r")
    script = tmp_path / "flips.py"
    script.write_text(FLIPS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "r"), str(part)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]  # a C++ abort inside pyarrow ends the process
    caught, same = map(int, done.stdout.split())
    assert caught > 100 and same == 0  # every flip in the footer is caught by the manifest's CRC


@pytest.mark.parametrize("how", ["copy", "symlink"])
def test_a_duplicated_part_is_named_not_read_twice(tmp_path, how):
    record(tmp_path / "r", flush_every=8)
    first, second = store.part_paths(tmp_path / "r")
    run_id = covshift.load(tmp_path / "r").meta["run_id"]
    for name in (f"part-000000900-{run_id}.parquet", "part-000000000-copy.parquet"):
        duplicate = tmp_path / "r" / name
        if how == "copy":
            shutil.copy(first, duplicate)
        else:
            duplicate.symlink_to(first.name)
        with pytest.raises(RunFileError, match=rf"{name} is a copy of {first.name}"):
            covshift.load(tmp_path / "r").stats()
        duplicate.unlink()
    assert covshift.load(tmp_path / "r").stats().step.nunique() == 16


def test_the_manifest_describes_every_part(tmp_path):
    run = record(tmp_path / "r", flush_every=5)
    parts = {path.name: path for path in store.part_paths(tmp_path / "r")}
    entries = manifest.read(tmp_path / "r", run.meta["run_id"])
    assert [entry.name for entry in entries] == sorted(parts) and len(entries) == 4
    for entry in entries:
        data = parts[entry.name].read_bytes()
        table = pq.read_table(parts[entry.name])
        steps = table["step"].to_pylist()
        assert entry.size == len(data) and entry.rows == table.num_rows
        assert entry.steps == (min(steps), max(steps))
        assert entry.layers == tuple(sorted(set(table["layer"].to_pylist())))
        assert sum(rows for *_, rows in entry.groups) == table.num_rows
    stored = json.loads((tmp_path / "r" / manifest.MANIFEST_FILE).read_text())
    assert stored["run_id"] == run.meta["run_id"]


def test_reads_skip_the_parts_and_row_groups_the_manifest_rules_out(tmp_path, monkeypatch):
    run = record(tmp_path / "r", flush_every=4)
    opened = []
    real = store.read_part

    def spy(path, *args, **kwargs):
        opened.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(store, "read_part", spy)
    frame = run.stats(steps=range(5, 7))
    assert sorted(frame.step.unique()) == [5, 6] and len(opened) == 1


def test_a_flipped_bit_in_the_manifest_is_named(tmp_path):
    record(tmp_path / "r")
    path = tmp_path / "r" / manifest.MANIFEST_FILE
    data = path.read_bytes()
    position = data.index(b'"rows"') + 10
    path.write_bytes(data[:position] + bytes([data[position] ^ 1]) + data[position + 1:])
    with pytest.raises(RunFileError, match=rf"{path} is corrupted"):
        covshift.load(tmp_path / "r").stats()


def test_a_part_written_before_a_crash_but_not_yet_listed_is_not_read(tmp_path):
    """A crash between a part's rename and the manifest's: the manifest is the commit; that flush's steps are lost."""
    run_id = record(tmp_path / "r", steps=8, flush_every=4).meta["run_id"]
    listed = manifest.read(tmp_path / "r", run_id)
    manifest.write(tmp_path / "r", run_id, listed[:1])  # the manifest as the first flush left it
    assert len(store.part_paths(tmp_path / "r")) == 2
    assert sorted(covshift.load(tmp_path / "r").stats().step.unique()) == [0, 1, 2, 3]


def test_a_manifest_edited_by_hand_is_named(tmp_path):
    record(tmp_path / "r", steps=8, flush_every=4)
    path = tmp_path / "r" / manifest.MANIFEST_FILE
    data = json.loads(path.read_text())
    data["parts"] = data["parts"][:1]
    path.write_text(json.dumps(data))
    with pytest.raises(RunFileError, match=rf"{path} is corrupted"):  # its own checksum
        covshift.load(tmp_path / "r").stats()


def test_a_run_without_a_manifest_is_read_as_before(tmp_path):
    original = record(tmp_path / "r", flush_every=5).stats()
    (tmp_path / "r" / manifest.MANIFEST_FILE).unlink()
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    meta["format_version"] = 3
    (tmp_path / "r" / "meta.json").write_text(json.dumps(meta))
    pd.testing.assert_frame_equal(covshift.load(tmp_path / "r").stats(), original)


def test_a_copy_among_the_parts_of_a_run_without_a_manifest_is_named(tmp_path):
    record(tmp_path / "r", flush_every=8)
    (tmp_path / "r" / manifest.MANIFEST_FILE).unlink()
    first = store.part_paths(tmp_path / "r")[0]
    shutil.copy(first, tmp_path / "r" / "part-000000000-copy.parquet")
    with pytest.raises(RunFileError, match="are the same part") as caught:  # which is the copy, nothing says
        covshift.load(tmp_path / "r").stats()
    assert first.name in str(caught.value) and "part-000000000-copy.parquet" in str(caught.value)


def test_a_saved_run_carries_a_manifest_that_matches_its_parts(tmp_path):
    model = greek()
    tracker = covshift.attach(model, every=1, store=tmp_path / "r", flush_every=3)
    for _ in range(5):
        model(torch.randn(8, 4))
    saved = tracker.run.save(tmp_path / "copy")  # two steps still buffered go to the copy
    tracker.detach()
    loaded = covshift.load(saved)
    entries = manifest.read(saved, loaded.meta["run_id"])
    assert sorted(entry.name for entry in entries) == sorted(p.name for p in store.part_paths(saved))
    assert sorted(loaded.stats().step.unique()) == [0, 1, 2, 3, 4]
