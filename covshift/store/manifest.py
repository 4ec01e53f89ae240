"""The run's manifest: which parts make the run, and what each one must look like.

Written atomically at each flush, after the part it adds (so it is the commit: a
part not listed in it is not part of the run). Per part it holds the name, byte
size, the length and CRC-32 of the Parquet footer, the rows, the layers, the
step range, the writer's step numbers (``seqs``) and per row group its first and
last layer and its rows. Readers check a part's footer against its entry before
pyarrow sees it (:func:`covshift.store.checked.verified_metadata`), then choose
parts by layers and steps, and row groups by layers, from the manifest alone.
The manifest carries a CRC of its own content.

Files named like parts but not listed are checked too: a part of another run, a
copy (or link) of a listed part, or a file of another name is an error naming
it; a part of this run's name that is no copy is what a crash between a part's
rename and the manifest's left behind, and is not read.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from covshift.store.checked import META_LIMIT, Footer, RunFileError, check_regular, read_bytes
from covshift.store.files import MANIFEST_FILE, PART_GLOB, write_atomic

MANIFEST_FORMAT = "covshift-manifest"
_PART_NAME = re.compile(r"part-(\d+)-([0-9a-f]+)\.parquet")


@dataclass(frozen=True)
class PartEntry:
    """One part as the manifest lists it."""

    name: str
    size: int
    footer: int  # bytes of the footer: metadata, its length and the magic
    crc: int  # CRC-32 of those bytes
    rows: int
    layers: tuple[str, ...]  # sorted
    steps: tuple[int, int]  # the smallest and largest step held
    seqs: tuple[int, int]  # the writer's numbers of the first and last step held
    groups: tuple[tuple[str, str, int], ...]  # per row group: first layer, last layer, rows

    @property
    def expected(self) -> Footer:
        return Footer(self.size, self.footer, self.crc)

    def row_groups(self, layers: list[str] | None) -> list[int] | None:
        """The row groups that can hold ``layers`` (rows are sorted by layer); None: every one."""
        if layers is None:
            return None
        return [i for i, (first, last, _) in enumerate(self.groups) if any(first <= n <= last for n in layers)]

    def holds(self, layers: list[str] | None, steps: tuple[int, int] | list[int] | None) -> bool:
        """Whether the part can hold rows of ``layers`` at ``steps`` (a [start, stop) range or a list)."""
        if layers is not None and not set(layers) & set(self.layers):
            return False
        if isinstance(steps, tuple):
            return steps[0] <= self.steps[1] and self.steps[0] < steps[1]
        if steps is not None:
            return any(self.steps[0] <= step <= self.steps[1] for step in steps)
        return True

    def to_json(self) -> dict:
        return {"name": self.name, "size": self.size, "footer": self.footer, "crc": self.crc, "rows": self.rows,
                "layers": list(self.layers), "steps": list(self.steps), "seqs": list(self.seqs),
                "groups": [list(group) for group in self.groups]}


def describe(name: str, footer: Footer, group_rows: list[int], table: pa.Table, seqs: tuple[int, int]) -> PartEntry:
    """The entry of a part just written from ``table`` (rows sorted by layer)."""
    steps = pc.min_max(table["step"]).as_py()
    layer = table["layer"]
    starts = np.cumsum([0, *group_rows[:-1]])
    groups = tuple((layer[int(s)].as_py(), layer[int(s + n - 1)].as_py(), n) for s, n in zip(starts, group_rows))
    layers = tuple(sorted(str(name) for name in pc.unique(layer).to_pylist()))
    return PartEntry(name, footer.size, footer.length, footer.crc, table.num_rows, layers,
                     (steps["min"], steps["max"]), seqs, groups)


def write(directory: Path, run_id: str, entries: Iterable[PartEntry]) -> None:
    """Replace the manifest of ``directory`` atomically with one listing ``entries``."""
    body = {"run_id": run_id, "parts": [entry.to_json() for entry in entries]}
    document = {"format": MANIFEST_FORMAT, "version": 1, **body, "crc": _crc(body)}
    write_atomic(directory / MANIFEST_FILE, json.dumps(document, separators=(",", ":")).encode())


def read(directory: Path, run_id: str | None) -> list[PartEntry] | None:
    """The entries of ``directory``'s manifest, checked; None when the run has none (written before manifests).

    Raises:
        RunFileError: the manifest is not a regular file, is corrupted or belongs to another run.
    """
    path = directory / MANIFEST_FILE
    if not os.path.lexists(path):
        return None
    try:
        document = json.loads(read_bytes(path, META_LIMIT).decode())
        body = {"run_id": document["run_id"], "parts": document["parts"]}
        if document.get("format") != MANIFEST_FORMAT or document.get("crc") != _crc(body):
            raise ValueError("its checksum does not match its content")
        entries = [_entry(item) for item in body["parts"]]
    except RunFileError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSON and UTF-8 errors are ValueErrors
        raise RunFileError(f"{path} is corrupted: {err}") from None
    if document["run_id"] != run_id:
        raise RunFileError(f"{path} belongs to run {document['run_id']}, not to this run ({run_id})")
    return entries


def check_unlisted(directory: Path, run_id: str | None, entries: list[PartEntry]) -> None:
    """Refuse the files named like parts that the manifest does not list, unless one is what a crash
    left behind (this run's name, not a copy of a listed part): those are not read.

    Raises:
        RunFileError: naming the file: a part of another run, a copy or link of a listed part, a file of another name.
    """
    listed = {entry.name: entry for entry in entries}
    by_footer = {(entry.size, entry.crc): entry.name for entry in entries}
    for path in sorted(directory.glob(PART_GLOB)):
        if path.name in listed:
            continue
        copy_of = by_footer.get(identity(path))
        if copy_of is not None:
            raise RunFileError(f"{path} is a copy of {copy_of} (or a link to it): its rows would be read twice; "
                               "remove it from the run directory")
        match = _PART_NAME.fullmatch(path.name)
        if match is None or match.group(2) != run_id:
            whose = f"run {match.group(2)}, not to this run ({run_id})" if match else "another run or was copied in"
            raise RunFileError(f"{path} belongs to {whose}: it is not in the run's {MANIFEST_FILE}, so it was "
                               "not written by this run; move it out of the run directory")


def identity(path: Path) -> tuple[int, int] | None:
    """``(size, footer CRC)`` of a file, read without parsing it; None if it is not one covshift could have written."""
    try:
        size = check_regular(path).st_size
        with open(path, "rb") as handle:
            handle.seek(max(size - 8, 0))
            length = int.from_bytes(handle.read(4), "little") + 8
            if size < 12 or length > size - 4:
                return None
            handle.seek(size - length)
            return size, zlib.crc32(handle.read(length))
    except OSError:
        return None


def check_copies(paths: list[Path]) -> None:
    """Among parts of a run without a manifest, refuse one that is a copy or a link of another."""
    seen: dict[tuple[int, int], Path] = {}
    for path in paths:
        key = identity(path)
        if key is not None and key in seen:
            raise RunFileError(f"{seen[key]} and {path.name} are the same part (one a copy of, or a link to, the "
                               "other): its rows would be read twice; remove one from the run directory")
        if key is not None:
            seen[key] = path


def _crc(body: dict) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _entry(item: dict) -> PartEntry:
    """A manifest entry from JSON, its fields checked (a hand-edited manifest fails its CRC first)."""
    pairs = [tuple(item[key]) for key in ("steps", "seqs")]
    groups = tuple((str(first), str(last), int(rows)) for first, last, rows in item["groups"])
    entry = PartEntry(str(item["name"]), int(item["size"]), int(item["footer"]), int(item["crc"]), int(item["rows"]),
                      tuple(str(name) for name in item["layers"]), *(tuple(map(int, p)) for p in pairs), groups)
    if not _PART_NAME.fullmatch(entry.name) or any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"a part entry is malformed: {item!r}")
    return entry
