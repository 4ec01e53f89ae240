"""Reading files that may not be what covshift wrote: regular files only, bounded sizes, and part
footers verified against the run's manifest before pyarrow parses them."""

from __future__ import annotations

import os
import stat
import zlib
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

#: Most bytes read from ``meta.json`` or the manifest (a run of ten thousand layers needs a few MB).
META_LIMIT = 64 * 2**20
#: Most bytes read from a JSON-lines file (curves, side tables).
JSONL_LIMIT = 2**30


class RunFileError(ValueError):
    """A run directory or one of its files is missing or unreadable."""


class Footer(NamedTuple):
    """What identifies a written part without trusting it: its byte size and its Parquet footer's
    length and CRC-32 (the footer: the file metadata, its length and the closing magic)."""

    size: int
    length: int
    crc: int


def footer_of(data: bytes) -> Footer:
    """The :class:`Footer` of a part's bytes."""
    length = int.from_bytes(data[-8:-4], "little") + 8
    return Footer(len(data), length, zlib.crc32(data[-length:]))


def check_regular(path: Path) -> os.stat_result:
    """``path``'s status, followed through links; anything but a regular file (a FIFO, a device, a
    directory) is refused by name, before it is opened: reading one could block or never end."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise RunFileError(f"{path} is missing") from None
    except OSError as err:
        raise RunFileError(f"{path} cannot be read: {err.strerror or err}") from None
    if not stat.S_ISREG(status.st_mode):
        raise RunFileError(f"{path} is not a regular file ({_kind(status.st_mode)}); covshift writes only regular files")
    return status


def read_bytes(path: Path, limit: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them (else RunFileError)."""
    check_regular(path)
    try:  # O_NONBLOCK: a FIFO put there after the check opens at once instead of waiting for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise RunFileError(f"{path} cannot be read: {err.strerror or err}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise RunFileError(f"{path} is not a regular file; covshift writes only regular files")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise RunFileError(f"{path} is larger than covshift reads ({limit:,} bytes): not a file covshift wrote")
    return data


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def verified_metadata(path: Path, expected: Footer) -> pq.FileMetaData:
    """The footer of the part at ``path``, once its size, length and CRC are those the manifest gives.

    Nothing of the file reaches pyarrow before that: a changed footer (a renamed
    layer in its statistics, a flipped bit in a row count) is a RunFileError
    naming the part, never a silently different read or a crash inside pyarrow.
    """
    size = check_regular(path).st_size
    problem = None
    if size != expected.size:
        problem = f"it holds {size:,} bytes, the manifest says {expected.size:,}"
    else:
        with open(path, "rb") as handle:
            handle.seek(size - expected.length)
            tail = handle.read(expected.length)
        if zlib.crc32(tail) != expected.crc or not tail.endswith(b"PAR1"):
            problem = "its CRC differs"
    if problem:
        raise RunFileError(
            f"{path} is corrupted: its footer does not match the run's manifest ({problem}); "
            "it was changed after it was written"
        )
    return pq.read_metadata(pa.BufferReader(b"PAR1" + tail))
