"""The writing half of a run: records buffered per step, finalized, flushed as Parquet parts (crash-safe)."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow.compute as pc

from covshift.checks import check_int
from covshift.faults import Faults
from covshift.store import files as store
from covshift.store import manifest
from covshift.store.records import SCHEMAS, PendingStep, records_to_table, sketch_rows

if TYPE_CHECKING:  # reading a run needs no torch: only recording imports it
    import torch

    from covshift.summary.summarize import Partial

#: The side table of the notices a run carries (:meth:`RunWriter.add_notice`).
NOTICES_TABLE = "notices"
#: The side table of the alerts raised while the run was recorded (``attach(..., on_alert=)``).
ALERTS_TABLE = "alerts"
DEFAULT_FLUSH_EVERY = 100
DEFAULT_MEMORY_BUDGET = 64 * 2**20
#: Channels per layer that keep quantiles and bin means (evenly spaced); every channel keeps its moments.
DEFAULT_SKETCH_CHANNELS = 64

def check_settings(*, flush_every: int, memory_budget: int, sketch_channels: int | None) -> None:
    """Refuse bad store settings with an error naming the setting (every rank of a job checks the same)."""
    check_int("flush_every", flush_every)
    check_int("memory_budget", memory_budget)
    if sketch_channels is not None:
        check_int("sketch_channels", sketch_channels)


class RunWriter:
    """A run's directory and buffer: :class:`~covshift.store.run.Run` reads what this writes.

    Each step's summaries are finalized when the step ends (the value samples are
    dropped there) and wait in memory until ``flush_every`` steps or ``memory_budget``
    bytes have gathered, then go to disk as one atomically written part, so memory
    does not grow with the length of training and a crash loses only what was never
    flushed. A directory that cannot be written (disk full) warns once; the steps
    stay buffered, within ``memory_budget``, until a later flush succeeds.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        meta: dict | None = None,
        *,
        flush_every: int = DEFAULT_FLUSH_EVERY,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        sketch_channels: int | None = DEFAULT_SKETCH_CHANNELS,
        resume: bool = False,
    ) -> None:
        if directory is None:
            directory = tempfile.mkdtemp(prefix="covshift-run-")
            weakref.finalize(self, shutil.rmtree, directory, ignore_errors=True)
        check_settings(flush_every=flush_every, memory_budget=memory_budget, sketch_channels=sketch_channels)
        self.directory = Path(directory)
        self.sketch_channels = sketch_channels
        self._sketch_rows: dict[int, torch.Tensor | None] = {}  # channel count -> sketched channels
        self.flush_every = flush_every
        self.memory_budget = memory_budget
        self._step_partials: list[tuple[int, str, str, Partial]] = []
        self._pending: list[PendingStep] = []
        self._pending_bytes = 0
        self._seq = 0  # number of the next finalized step
        self._retry_at: int | None = None  # after a failed write: retry when _seq reaches it
        self._dropped = 0  # steps dropped while the directory could not be written
        self._faults = Faults()  # the store's warnings, each said once until writes work again
        self._curves_created = False
        self._frames: dict[str | None, pd.DataFrame] = {}  # stats() per source
        self._frames_key: tuple | None = None
        self._meta_dirty = False
        # The parts this run wrote, as its manifest lists them (None: a stored run, whose manifest is read
        # at each read); the manifest on disk is rewritten when _manifest_dirty.
        self._entries: list[manifest.PartEntry] | None = None
        self._manifest_dirty = False
        self._cut: int | None = None  # resumed: stored steps from this one on are replaced at the next commit
        self._resumed_rows: dict[str, int] | None = None  # resumed: rows per JSON-lines file written before
        self._superseded: list[str] = []  # parts to delete once the manifest no longer lists them
        self._appended = False  # rows logged since the run was resumed
        self._rows_cut: int | None = None  # resumed: the step the curves and side tables are cut at, once committed
        if meta is None:  # opening a stored run
            self._meta_key = store.meta_stamp(self.directory)  # before the read: a change after it is re-read
            self._meta = store.read_meta(self.directory)
            self._run_id: str | None = self._meta.get("run_id")
            self._writable = False
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if resume and os.path.lexists(self.directory / store.META_FILE):
            self._reopen()
            return
        self._run_id = store.new_run_id()
        self._meta = {"format": store.FORMAT, "format_version": store.FORMAT_VERSION, **meta, "run_id": self._run_id}
        self._meta.setdefault("layers", [])
        store.claim(self.directory, self._meta)
        self._entries = []
        self._writable = True
        self._manifest_dirty = True
        self.flush()  # an empty manifest: from now on, only the parts it lists are the run's

    def _reopen(self) -> None:
        """Go on writing the stored run in ``directory`` (``resume=True``): it must have a manifest."""
        self._meta = store.read_meta(self.directory)
        self._run_id = self._meta.get("run_id")
        entries = manifest.read(self.directory, self._run_id)
        if entries is None:
            raise ValueError(
                f"{self.directory} holds a run written by an earlier covshift (format "
                f"{self._meta['format_version']}, no {store.MANIFEST_FILE}): it cannot be resumed; record the "
                "resumed training into a new directory"
            )
        manifest.check_unlisted(self.directory, self._run_id, entries)  # a copy or a stray part: refused now
        self._entries = entries
        self._seq = max((entry.seqs[1] for entry in entries), default=-1) + 1
        self._resumed_rows = {path.name: store.cut_partial_line(path) for path in self.directory.glob("*.jsonl")}
        self._curves_created = os.path.lexists(self.directory / store.CURVES_FILE)
        self._writable = True

    def resume_at(self, step: int) -> None:
        """A resumed run goes on at ``step``: the rows it stored from ``step`` on are replaced when new
        rows are first committed (until then, a crash leaves the run as it was). No-op otherwise."""
        if self._resumed_rows is not None:
            self._cut = step

    def _apply_cut(self) -> None:
        """Drop the stored steps from ``_cut`` on: parts past it leave the manifest, a part across it is
        written anew without them (under a new name: a listed part is never rewritten). The manifest
        written next commits it together with the new steps."""
        cut = self._cut
        entries = []
        for entry in self._entries:
            if entry.steps[1] < cut:
                entries.append(entry)
                continue
            self._superseded.append(entry.name)
            if entry.steps[0] < cut:
                path = self.directory / entry.name
                table = store.read_part(path, self._run_id, SCHEMAS, footer=entry.expected, filters=pc.field("step") < cut)
                number, self._seq = self._seq, self._seq + 1
                kept = store.part_path(self.directory, number, self._run_id)
                footer, groups = store.write_part(kept, table, self._run_id)
                entries.append(manifest.describe(kept.name, footer, groups, table, entry.seqs))
        self._entries = entries
        self._manifest_dirty = True
        self._meta.setdefault("resumed", []).append(
            {"step": cut, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        self._meta_dirty = True
        self._rows_cut, self._cut = cut, None

    def _cut_rows(self, cut: int) -> None:
        """Drop the rows at steps from ``cut`` on that the curves and side tables held before resuming."""
        for name, before in (self._resumed_rows or {}).items():
            path = self.directory / name
            lines = store.read_bytes(path, store.JSONL_LIMIT).decode().splitlines(keepends=True)
            kept = [line for line in lines[:before] if _step_of(line) is None or _step_of(line) < cut]
            if len(kept) < before:
                store.write_atomic(path, "".join(kept + lines[before:]).encode())
        self._resumed_rows, self._rows_cut = {}, None

    # -- writing -----------------------------------------------------------------
    def add_layer(self, name: str, type_name: str, channels: int, channel_dim: int | None) -> None:
        """Describe a layer the first time it is recorded (stored with the next flush)."""
        self._meta["layers"].append(
            {"name": name, "type": type_name, "channels": channels, "channel_dim": channel_dim}
        )
        self._meta_dirty = True

    def append(self, step: int, source: str, layer: str, partial: Partial) -> None:
        """Buffer one layer's summary at the current step; :meth:`end_step` closes the step.

        Summaries of an earlier step that never reached :meth:`end_step` (interrupted) are dropped.
        """
        self._check_writable()
        if self._step_partials and self._step_partials[0][0] != step:
            self._step_partials = []  # an interrupted step that never ended: not stored
        self._step_partials.append((step, source, layer, partial))

    def end_step(self) -> PendingStep | None:
        """Finalize the step's summaries; flush when ``flush_every`` steps or the memory budget are reached.

        Parts therefore always hold whole steps. Finalizing here rather than at
        the flush frees each step's value samples at once: memory is reused from
        step to step instead of piling up until the flush. After a failed write
        the flush is retried every ``flush_every`` steps, and meanwhile the oldest
        buffered steps are dropped beyond ``memory_budget``.
        """
        finalized = self._finalize_step()
        if self._retry_at is not None:
            if self._seq >= self._retry_at:
                self.flush()
            self._drop_over_budget()
        elif len(self._pending) >= self.flush_every or self._pending_bytes >= self.memory_budget:
            self.flush()
        return finalized

    def _finalize_step(self) -> PendingStep | None:
        """Finalize the open step into the buffer (each assignment leaves a consistent state if interrupted)."""
        if not self._step_partials:
            return None
        partials, self._step_partials = self._step_partials, []
        from covshift.summary.finalize import finalize

        record = finalize(
            [partial for *_, partial in partials],
            [self._sketched(partial.count.shape[0]) for *_, partial in partials],
        )
        keys = [(step, source, layer, partial.count.shape[0]) for step, source, layer, partial in partials]
        nbytes = sum(t.nbytes for t in (record.stats, record.quantiles, record.binmeans))
        seq = self._seq
        self._seq = seq + 1
        finalized = PendingStep(seq, keys, record, nbytes)
        self._pending.append(finalized)
        self._pending_bytes += nbytes
        return finalized

    def _sketched(self, channels: int) -> torch.Tensor | None:
        """The channels of a ``channels``-wide record that keep quantiles and bin means (None: all)."""
        if channels not in self._sketch_rows:
            self._sketch_rows[channels] = sketch_rows(channels, self.sketch_channels)
        return self._sketch_rows[channels]

    def flush(self) -> None:
        """Write the ended steps to a Parquet part (no-op when none is buffered). Never raises OSError.

        The part is named after its first step, so a flush interrupted after the
        part was renamed into place (Ctrl-C) writes the same name again when
        repeated: it replaces the part rather than adding a copy. When the
        directory cannot be written, one :class:`~covshift.store.StoreWarning`
        says why and the steps stay buffered for the next flush.
        """
        if not self._writable:
            return
        try:
            if self._cut is not None and (self._pending or self._appended):
                self._apply_cut()
            if self._meta_dirty:
                store.write_meta(self.directory, self._meta)
                self._meta_dirty = False
            self._write_pending()
            if self._manifest_dirty:
                manifest.write(self.directory, self._run_id, self._entries)
                self._manifest_dirty = False
                for name in self._superseded:  # no longer listed: not read, so removed
                    (self.directory / name).unlink(missing_ok=True)
                self._superseded = []
            if self._rows_cut is not None and not self._manifest_dirty:  # the records' cut is committed
                self._cut_rows(self._rows_cut)
        except OSError as err:
            self._retry_at = self._seq + self.flush_every
            self._warn_once(
                "write",
                f"cannot write to {self.directory}: {err.strerror or err}; recording goes on and "
                f"unwritten steps wait in memory (within memory_budget={self.memory_budget} bytes) "
                "for a later flush",
            )
            return
        if self._retry_at is not None:
            self._recovered()

    def _write_pending(self) -> None:
        """Write the buffered steps as a part and list it (each assignment leaves a consistent state if
        interrupted: a part listed in the manifest on disk is never written again).

        The manifest, written after the part, is the commit: a crash between the two leaves a part that
        is not listed, which readers do not read.
        """
        committed = max((entry.seqs[1] for entry in self._entries), default=-1)
        while self._pending and self._pending[0].seq <= committed:  # listed already (an interrupted flush)
            self._pending_bytes -= self._pending.pop(0).nbytes
        if not self._pending:
            return
        self._manifest_dirty = True
        seqs = (self._pending[0].seq, self._pending[-1].seq)
        path = store.part_path(self.directory, seqs[0], self._run_id)
        table = records_to_table(self._pending)
        footer, groups = store.write_part(path, table, self._run_id)
        self._entries = [*self._entries, manifest.describe(path.name, footer, groups, table, seqs)]
        self._pending = []
        self._pending_bytes = 0

    def _drop_over_budget(self) -> None:
        """While the directory cannot be written, drop the oldest buffered steps beyond the memory budget."""
        dropped = 0
        while self._pending and self._pending_bytes > self.memory_budget:
            self._pending_bytes -= self._pending.pop(0).nbytes
            dropped += 1
        self._dropped += dropped
        if dropped:
            self._warn_once(
                "drop",
                f"{self.directory} still cannot be written and the unwritten steps exceed "
                f"memory_budget={self.memory_budget} bytes: dropped the oldest {dropped} "
                f"step{'s' if dropped > 1 else ''}, and later ones are dropped the same way",
            )

    def _recovered(self) -> None:
        """The directory takes writes again: say how many steps were lost meanwhile."""
        self._retry_at = None
        self._faults.warned -= {"write", "drop"}
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            warnings.warn(
                f"covshift: {self.directory} takes writes again; {dropped} step{'s' if dropped > 1 else ''} "
                "recorded while it could not were dropped (memory_budget) and are missing from the run",
                store.StoreWarning,
                stacklevel=3,
            )

    def log(self, step: int, **values: float) -> None:
        """Store scalars such as loss and accuracy at ``step`` (training curves).

        A curves file this run did not create, or a failing disk, warns once and the row is not stored.
        """
        self._check_writable()
        self._appended = self._resumed_rows is not None
        row = {"step": int(step)}
        row.update({name: float(value) for name, value in values.items()})
        try:
            store.append_curve(self.directory, row, create=not self._curves_created)
            self._curves_created = True
        except FileExistsError:
            self._warn_once(
                "curves",
                f"{self.directory / store.CURVES_FILE} was not written by this run; "
                "training curves are not logged to it",
            )
        except OSError as err:
            self._curves_created = (self.directory / store.CURVES_FILE).exists()  # it may be, before the write failed
            self._warn_once("write", f"cannot write to {self.directory}: {err.strerror or err}")

    def append_table(self, name: str, rows: list[dict]) -> None:
        """Append ``rows`` to the run's side table ``name`` (:func:`~covshift.store.files.table_path`), at once.

        For measurements made beside the records (the null floor, gradient ICS): they
        are stored in the run and read back with :meth:`~covshift.store.run.Run.table`.
        """
        self._check_writable()
        self._appended = self._resumed_rows is not None
        store.append_jsonl(store.table_path(self.directory, name), rows)

    def add_notice(self, text: str) -> None:
        """Store a notice with the run (e.g. "trained on fallback data"): every report of it shows it at the top."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a notice is a non-empty text, got {text!r}")
        self.append_table(NOTICES_TABLE, [{"notice": text}])

    def _warn_once(self, key: str, message: str) -> None:
        self._faults.warn_once(key, message, stacklevel=4, category=store.StoreWarning)

    def _check_writable(self) -> None:
        if not self._writable:
            raise RuntimeError(f"run at {self.directory} was loaded from disk and is read-only")


def _step_of(line: str) -> int | None:
    """The ``step`` of a JSON-lines row (None: a row without one, or not JSON)."""
    import json

    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None
