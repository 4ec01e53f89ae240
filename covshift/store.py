"""The on-disk run directory: ``meta.json``, append-only Parquet parts, ``curves.jsonl``.

Every file is written to a temporary name, flushed to disk and renamed into
place, so a process killed at any moment leaves only complete files behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

META_FILE = "meta.json"
CURVES_FILE = "curves.jsonl"
PART_GLOB = "part-*.parquet"
FORMAT = "covshift-run"
FORMAT_VERSION = 1


class RunFileError(ValueError):
    """A run directory or one of its files is missing or unreadable."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_meta(directory: Path, meta: dict) -> None:
    write_atomic(directory / META_FILE, json.dumps(meta, indent=2).encode())


def read_meta(directory: Path) -> dict:
    """Read and check ``meta.json``; errors name the file and what is wrong with it."""
    if not directory.exists():
        raise RunFileError(f"no run at {directory}: the directory does not exist")
    if not directory.is_dir():
        raise RunFileError(f"no run at {directory}: it is a file, not a run directory")
    path = directory / META_FILE
    if not path.exists():
        raise RunFileError(f"{path} is missing: {directory} is not a covshift run directory")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFileError(f"{path} is corrupted: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RunFileError(f"{path} is not covshift run metadata (no format: {FORMAT!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise RunFileError(
            f"{path} has format version {meta['format_version']}; this covshift reads "
            f"up to {FORMAT_VERSION}: upgrade covshift"
        )
    return meta


def part_paths(directory: Path) -> list[Path]:
    """Completed parts in the order they were written."""
    return sorted(directory.glob(PART_GLOB))


def write_part(directory: Path, index: int, table: pa.Table) -> Path:
    path = directory / f"part-{index:06d}.parquet"
    sink = pa.BufferOutputStream()
    # Dictionary encoding only where values repeat: on float columns it is wasted work.
    pq.write_table(table, sink, use_dictionary=["source", "layer"])
    write_atomic(path, sink.getvalue().to_pybytes())
    return path


def read_part(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise RunFileError(f"{path} is corrupted: not a readable Parquet file ({err})") from None


def append_curve(directory: Path, row: dict) -> None:
    with open(directory / CURVES_FILE, "a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_curves(directory: Path) -> list[dict]:
    """Logged rows; a last line cut short by a crash is dropped, any other bad line is an error."""
    path = directory / CURVES_FILE
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise RunFileError(f"{path} is corrupted at line {number}: not valid JSON") from None
    return rows
