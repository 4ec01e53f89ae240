"""Files of a run directory that are not regular files, or never end: refused by name, never read.

Each read runs in a subprocess with a deadline and a cap on its address space,
so a reader that blocks on a FIFO or reads /dev/zero until memory runs out
fails the test instead of hanging it or exhausting the machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import covshift
from covshift.store import files as store

ROOT = Path(__file__).resolve().parents[1]

READ = textwrap.dedent(
    """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
    import covshift
    from covshift.store.files import RunFileError
    try:
        run = covshift.load(sys.argv[1])
        run.stats(); run.curves(); run.table("null_floor")
    except RunFileError as err:
        print("RunFileError:", err)
    else:
        print("read")
    """
)


def read_in_subprocess(directory: Path, tmp_path: Path) -> str:
    script = tmp_path / "read.py"
    script.write_text(READ)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run([sys.executable, str(script), str(directory)], env=env, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {directory} still blocked after 60 s")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def record(directory: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with covshift.attach(model, every=1, store=directory) as tracker:
        for step in range(3):
            model(torch.randn(8, 4))
            tracker.run.log(step, loss=1.0)


def fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def to_dev_zero(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


@pytest.mark.parametrize(
    ("name", "make", "kind"),
    [
        ("part", fifo, "a FIFO"),
        ("meta.json", fifo, "a FIFO"),
        ("manifest.json", fifo, "a FIFO"),
        ("curves.jsonl", fifo, "a FIFO"),
        ("null_floor.jsonl", fifo, "a FIFO"),
        ("meta.json", to_dev_zero, "a character device"),
        ("curves.jsonl", to_dev_zero, "a character device"),
        ("manifest.json", to_dev_zero, "a character device"),
    ],
)
def test_a_file_that_is_not_a_regular_file_is_refused_by_name(tmp_path, name, make, kind):
    record(tmp_path / "r")
    path = store.part_paths(tmp_path / "r")[0] if name == "part" else tmp_path / "r" / name
    make(path)
    assert read_in_subprocess(tmp_path / "r", tmp_path) == (
        f"RunFileError: {path} is not a regular file ({kind}); covshift writes only regular files"
    )


def test_a_fifo_among_the_parts_of_a_run_without_a_manifest_is_refused(tmp_path):
    record(tmp_path / "r")
    (tmp_path / "r" / "manifest.json").unlink()
    fifo(tmp_path / "r" / "part-000000009-0123.parquet")
    assert "part-000000009-0123.parquet is not a regular file (a FIFO)" in read_in_subprocess(tmp_path / "r", tmp_path)


def test_meta_json_larger_than_any_covshift_writes_is_refused(tmp_path, monkeypatch):
    record(tmp_path / "r")
    monkeypatch.setattr(store, "META_LIMIT", 100)
    with pytest.raises(store.RunFileError, match=r"meta.json is larger than covshift reads \(100 bytes\)"):
        covshift.load(tmp_path / "r")
