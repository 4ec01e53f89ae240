"""The on-disk run directory: ``meta.json``, Parquet parts, ``curves.jsonl``.

Every file is written to a fresh temporary name, flushed to disk and renamed into
place, so a process killed at any moment leaves only complete files behind. A run
claims its directory by creating ``meta.json`` exclusively and writes no file
that was there before it. Each part is tagged with the run's id, carries page
checksums (verified on read) and is named after the first step it holds, so
writing the same steps again replaces that part instead of adding a copy; the
run's manifest (:mod:`covshift.store.manifest`) lists the parts and their footers.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from covshift import schedule
from covshift.checks import MAX_STEP
from covshift.faults import CovshiftWarning
from covshift.store.checked import (  # noqa: F401 - RunFileError and Footer are named here too
    JSONL_LIMIT, META_LIMIT, Footer, RunFileError, check_regular, footer_of, read_bytes, verified_metadata,
)

META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
CURVES_FILE = "curves.jsonl"
PART_GLOB = "part-*.parquet"
FORMAT = "covshift-run"
#: 4: a manifest (``manifest.json``, :mod:`covshift.store.manifest`) lists the parts and checks their
#: footers. 3: quantiles and bin means may be null (channels outside a layer's sketched subset), rows
#: sorted by layer in row groups of ROW_GROUP_ROWS, zstd. 2: parts tagged with the run id of
#: ``meta.json``, page checksums. 1: untagged parts. This covshift reads all four; a run without a
#: manifest is read as format 3 was.
FORMAT_VERSION = 4
#: Rows per Parquet row group: small enough that reading one layer skips most of a part.
ROW_GROUP_ROWS = 16384
RUN_ID_KEY = b"covshift.run_id"
ROWS_KEY = b"covshift.rows"  # the footer's row counts are not checksummed: a flipped bit could cut a part short
_LAYER_FIELDS = {"name": str, "type": str, "channels": int, "channel_dim": (int, type(None))}


class StoreWarning(CovshiftWarning):
    """The run directory could not be written; recording goes on, buffered in memory."""


def new_run_id() -> str:
    """A random id for a new run, stored in ``meta.json`` and in each of its parts."""
    return secrets.token_hex(8)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    On any failure the temporary file is removed again.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except FileExistsError:  # not ours: leave it
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def meta_stamp(directory: Path) -> tuple | None:
    """``meta.json``'s (inode, size, mtime): it changed when this changed (None: it cannot be seen)."""
    try:
        status = os.stat(directory / META_FILE)
    except OSError:
        return None
    return (status.st_ino, status.st_size, status.st_mtime_ns)


def claim(directory: Path, meta: dict) -> None:
    """Start a run in ``directory`` by creating ``meta.json``; of two runs started at once, one wins.

    Raises:
        FileExistsError: the directory holds a run, or files of the names covshift writes.
    """
    taken = [name for name in (META_FILE, CURVES_FILE, MANIFEST_FILE) if (directory / name).exists()]
    taken += [path.name for path in part_paths(directory)]
    if taken and taken[0] != META_FILE:
        raise FileExistsError(
            f"{directory} already holds {', '.join(taken)}, which this run did not write; "
            "choose a new directory"
        )
    # meta.json may appear now (another run started at once): the exclusive create below then says so
    others = sorted(path.name for path in directory.iterdir()
                    if not path.name.startswith(".") and path.name != META_FILE)
    if others and not taken:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise FileExistsError(f"{directory} holds {shown}, which is not a covshift run: choose a new or empty "
                              "directory for the run")
    path = directory / META_FILE
    try:
        with open(path, "x") as handle:  # fails if another run created it first
            handle.write(json.dumps(meta, indent=2))
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(directory)
    except FileExistsError:
        raise FileExistsError(f"{directory} already holds a covshift run; choose a new directory, or pass "
                              "resume=True to go on with it") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise


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
        meta = json.loads(read_bytes(path, META_LIMIT).decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFileError(f"{path} is corrupted: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RunFileError(f"{path} is not covshift run metadata (no format: {FORMAT!r})")
    version = meta.get("format_version")
    if type(version) is not int or version < 1:
        raise RunFileError(f"{path} is corrupted: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise RunFileError(
            f"{path} has format version {version}; this covshift reads up to {FORMAT_VERSION}: upgrade covshift"
        )
    problem = _meta_problem(meta, version)
    if problem:
        raise RunFileError(f"{path} is corrupted: {problem}")
    return meta


def _meta_problem(meta: dict, version: int) -> str | None:
    """What is wrong with the fields of ``meta`` that covshift relies on, or None."""
    if version >= 2 and not isinstance(meta.get("run_id"), str):
        return f"run_id must be a string, got {meta.get('run_id')!r}"
    if not isinstance(meta.get("name"), (str, type(None))):
        return f"name must be a string, got {meta['name']!r}"
    config = meta.get("config", {})
    if not isinstance(config, dict):
        return f"config must be a dict of settings, got {config!r}"
    try:
        schedule.from_config(config)
    except (ValueError, TypeError) as err:
        return f"config holds no schedule a run could be recorded with ({err})"
    layers = meta.get("layers")
    if not isinstance(layers, list):
        return f"layers must be a list of layer descriptions, got {layers!r}"
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or any(
            type(layer.get(key)) is bool or not isinstance(layer.get(key), kind)
            for key, kind in _LAYER_FIELDS.items()
        ):
            return f"layers[{i}] must have a name, type, channels and channel_dim, got {layer!r}"
    return None


def part_paths(directory: Path) -> list[Path]:
    """Completed parts in the order they were written."""
    return sorted(directory.glob(PART_GLOB))


def part_path(directory: Path, first: int, run_id: str) -> Path:
    """The part holding the buffered steps from number ``first`` on (steps numbered from 0 per run)."""
    return directory / f"part-{first:09d}-{run_id}.parquet"


def write_part(path: Path, table: pa.Table, run_id: str) -> tuple[Footer, list[int]]:
    """Write ``table`` to ``path``, tagged with ``run_id`` and with page checksums; return its
    :class:`Footer` and the rows of each of its row groups (for the run's manifest).

    Rows are expected sorted by layer (then source, step, channel): row groups of
    :data:`ROW_GROUP_ROWS` rows then hold few layers each, so a read of some
    layers skips the others' row groups.
    """
    sink = pa.BufferOutputStream()
    table = table.replace_schema_metadata({RUN_ID_KEY: run_id.encode(), ROWS_KEY: str(table.num_rows).encode()})
    floats = [field.name for field in table.schema if pa.types.is_floating(field.type)]
    pq.write_table(
        table,
        sink,
        row_group_size=ROW_GROUP_ROWS,
        compression="zstd",
        use_dictionary=["source", "layer"],  # where values repeat; on float columns it is wasted work
        use_byte_stream_split=floats,  # float bytes split by significance: zstd then finds the repeats
        write_page_checksum=True,
    )
    data = sink.getvalue().to_pybytes()
    metadata = pq.read_metadata(pa.BufferReader(data))
    write_atomic(path, data)
    return footer_of(data), [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


def read_part(
    path: Path,
    run_id: str | None,
    schema: pa.Schema | tuple[pa.Schema, ...],
    *,
    columns: list[str] | None = None,
    filters: pc.Expression | None = None,
    layers: list[str] | None = None,
    footer: Footer | None = None,
    groups: list[int] | None = None,
) -> pa.Table:
    """Read a part, or its ``columns`` and rows matching ``filters``, and check it.

    Checks the page checksums of what is read, the part's run id (None: an
    untagged part), its row count and its columns (``schema``, or one of a tuple of them). With ``footer`` (from the
    run's manifest) the footer is verified before pyarrow parses it, and
    ``groups`` (also from the manifest; None: all) are the row groups read.
    Without (a run written before manifests), with ``layers`` only the row
    groups whose statistics can hold one of them are read.
    """
    metadata = verified_metadata(path, footer) if footer is not None else None
    if metadata is None:
        check_regular(path)
    try:
        parquet = pq.ParquetFile(path, metadata=metadata, page_checksum_verification=True)
        stored = parquet.schema_arrow
        tags = stored.metadata or {}
        tag = tags[RUN_ID_KEY].decode() if RUN_ID_KEY in tags else None
        rows = int(tags.get(ROWS_KEY, parquet.metadata.num_rows))
        held = sum(parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups))
    except (pa.ArrowException, OSError, ValueError, KeyError) as err:  # UnicodeDecodeError is a ValueError
        raise RunFileError(f"{path} is corrupted: not a readable Parquet file ({err})") from None
    if rows != held:
        raise RunFileError(f"{path} is corrupted: it holds {held} rows, {rows} were written")
    if tag != run_id:
        whose = f"run {tag}" if tag else "an untagged (format 1) run"
        raise RunFileError(
            f"{path} belongs to {whose}, not to this run ({run_id or 'untagged'}): "
            "it was not written by this run; move it out of the run directory"
        )
    accepted = schema if isinstance(schema, tuple) else (schema,)
    schema = accepted[0]
    if not any(stored.remove_metadata().equals(one) for one in accepted):
        missing = [name for name in schema.names if name not in stored.names]
        extra = [name for name in stored.names if name not in schema.names]
        detail = f"missing columns {missing}, unexpected columns {extra}" if missing or extra else "column types differ"
        raise RunFileError(f"{path} does not hold covshift records: {detail}")
    try:
        if groups is None:
            groups = _row_groups(parquet, layers if footer is None else None)
        table = parquet.read_row_groups(groups, columns=columns) if groups else stored.empty_table().select(columns or stored.names)
        table.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise RunFileError(f"{path} is corrupted: not a readable Parquet file ({err})") from None
    if "step" in table.column_names and table.num_rows:
        bounds = pc.min_max(table["step"]).as_py()
        outside = bounds["min"] if bounds["min"] < 0 else bounds["max"] if bounds["max"] > MAX_STEP else None
        if outside is not None:
            raise RunFileError(f"{path} is corrupted: it holds step {outside}, outside 0 … 2^53 - 1 (no run records it)")
    if filters is not None:
        try:
            table = table.filter(filters)
        except (pa.ArrowException, ValueError) as err:
            raise RunFileError(f"{path} is corrupted: not a readable Parquet file ({err})") from None
    return table.replace_schema_metadata(None)


def _row_groups(parquet: pq.ParquetFile, layers: list[str] | None) -> list[int]:
    """The row groups of ``parquet`` whose ``layer`` statistics can hold one of ``layers`` (None: all)."""
    metadata = parquet.metadata
    if layers is None:
        return list(range(metadata.num_row_groups))
    column = parquet.schema_arrow.get_field_index("layer")
    groups = []
    for index in range(metadata.num_row_groups):
        statistics = metadata.row_group(index).column(column).statistics
        if statistics is None or not statistics.has_min_max or any(
            statistics.min <= name <= statistics.max for name in layers
        ):
            groups.append(index)
    return groups


def append_jsonl(path: Path, rows: list[dict], *, create: bool = False) -> None:
    """Append ``rows`` to ``path`` as JSON lines and fsync; ``create``: it must not exist yet (FileExistsError).

    A failed write is cut off again, so no partial line stays behind.
    """
    with open(path, "xb" if create else "ab", buffering=0) as handle:
        end = handle.seek(0, os.SEEK_END)
        try:
            data = "".join(json.dumps(row) + "\n" for row in rows).encode()
            while data:
                data = data[handle.write(data) :]
            os.fsync(handle.fileno())
        except BaseException:
            handle.truncate(end)
            raise


def cut_partial_line(path: Path) -> int:
    """Remove a last line cut short by a crash from the JSON-lines file ``path`` (so rows appended next
    start on a line of their own); return its complete lines."""
    data = read_bytes(path, JSONL_LIMIT)
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
            os.fsync(handle.fileno())
    return data[:end].count(b"\n")


def append_curve(directory: Path, row: dict, *, create: bool) -> None:
    """Append ``row`` to the curves file; ``create``: it must not exist yet (FileExistsError).

    A failed write is cut off again, so no partial line stays behind.
    """
    append_jsonl(directory / CURVES_FILE, [row], create=create)


def read_jsonl(path: Path, error: type[Exception] = RunFileError) -> list[dict]:
    """The rows of a JSON-lines file; a last line cut short by a crash is dropped, any other bad line raises ``error``."""
    try:
        lines = read_bytes(path, JSONL_LIMIT).decode().splitlines()
    except UnicodeDecodeError:
        raise error(f"{path} is corrupted: not UTF-8 text") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise error(f"{path} is corrupted at line {number}: not valid JSON") from None
    return rows


def table_path(directory: Path, name: str) -> Path:
    """Where a run keeps its side table ``name`` (``<name>.jsonl``), for measurements beside the records.

    >>> table_path(Path("runs/a"), "null_floor").as_posix()
    'runs/a/null_floor.jsonl'
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a table name must be letters, digits and _, got {name!r}")
    return directory / f"{name}.jsonl"


def read_curves(directory: Path) -> list[dict]:
    """Logged rows; a last line cut short by a crash is dropped, any other bad line is an error."""
    path = directory / CURVES_FILE
    if not os.path.lexists(path):
        return []
    return read_jsonl(path)
