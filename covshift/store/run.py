"""`Run`: the recorded summaries of one training run, buffered in memory and stored on disk."""

from __future__ import annotations

import functools
import operator
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from covshift.store import files as store
from covshift.checks import check_choice, check_int
from covshift.columns import SOURCES
from covshift.faults import Faults
from covshift.store.records import SCHEMA, PendingStep, checked_columns, records_to_table, sketch_rows, steps_filter

if TYPE_CHECKING:  # reading a run needs no torch: only recording imports it
    import torch

    from covshift.summary.summarize import Partial

DEFAULT_FLUSH_EVERY = 100
DEFAULT_MEMORY_BUDGET = 64 * 2**20
#: Channels per layer that keep quantiles and bin means (evenly spaced); every channel keeps its moments.
DEFAULT_SKETCH_CHANNELS = 64
#: Layer names an error message lists before "and N more".
LAYERS_SHOWN = 12

def check_settings(*, flush_every: int, memory_budget: int, sketch_channels: int | None) -> None:
    """Refuse bad store settings with an error naming the setting (every rank of a job checks the same)."""
    check_int("flush_every", flush_every)
    check_int("memory_budget", memory_budget)
    if sketch_channels is not None:
        check_int("sketch_channels", sketch_channels)


class Run:
    """Summaries of one training run: a directory of Parquet parts plus a small buffer.

    Trackers create runs; :func:`load` opens stored ones. Each step's summaries
    are finalized when the step ends (the value samples are dropped there) and
    wait in memory until ``flush_every`` steps or ``memory_budget`` bytes have
    gathered, then go to disk as one atomically written part, so memory does not
    grow with the length of training and a crash loses only what was never
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
        if meta is None:  # opening a stored run
            self._meta = store.read_meta(self.directory)
            self._run_id: str | None = self._meta.get("run_id")
            self._writable = False
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._run_id = store.new_run_id()
        self._meta = {"format": store.FORMAT, "format_version": store.FORMAT_VERSION, **meta, "run_id": self._run_id}
        self._meta.setdefault("layers", [])
        store.claim(self.directory, self._meta)
        self._writable = True

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

    def end_step(self) -> None:
        """Finalize the step's summaries; flush when ``flush_every`` steps or the memory budget are reached.

        Parts therefore always hold whole steps. Finalizing here rather than at
        the flush frees each step's value samples at once: memory is reused from
        step to step instead of piling up until the flush. After a failed write
        the flush is retried every ``flush_every`` steps, and meanwhile the oldest
        buffered steps are dropped beyond ``memory_budget``.
        """
        self._finalize_step()
        if self._retry_at is not None:
            if self._seq >= self._retry_at:
                self.flush()
            self._drop_over_budget()
        elif len(self._pending) >= self.flush_every or self._pending_bytes >= self.memory_budget:
            self.flush()

    def _finalize_step(self) -> None:
        """Finalize the open step into the buffer (each assignment leaves a consistent state if interrupted)."""
        if not self._step_partials:
            return
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
        self._pending.append(PendingStep(seq, keys, record, nbytes))
        self._pending_bytes += nbytes

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
            if self._meta_dirty:
                store.write_meta(self.directory, self._meta)
                self._meta_dirty = False
            if self._pending:
                path = store.part_path(self.directory, self._pending[0].seq, self._run_id)
                store.write_part(path, records_to_table(self._pending), self._run_id)
                self._pending = []
                self._pending_bytes = 0
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

    def _warn_once(self, key: str, message: str) -> None:
        self._faults.warn_once(key, message, stacklevel=4, category=store.StoreWarning)

    def _check_writable(self) -> None:
        if not self._writable:
            raise RuntimeError(f"run at {self.directory} was loaded from disk and is read-only")

    # -- reading -----------------------------------------------------------------
    @property
    def meta(self) -> dict:
        """Configuration, versions and layer descriptions, as stored in ``meta.json``."""
        return self._meta

    @property
    def name(self) -> str:
        """A short label for plots and tables: the ``name`` given, else the directory name."""
        return self._meta.get("name") or self.directory.name

    @property
    def layers(self) -> pd.DataFrame:
        """One row per recorded layer: ``layer, type, channels, channel_dim``."""
        layers = pd.DataFrame(self._meta["layers"], columns=["name", "type", "channels", "channel_dim"])
        return layers.rename(columns={"name": "layer"})

    def stats(
        self,
        source: str | None = None,
        *,
        layers: str | Sequence[str] | None = None,
        steps: int | Iterable[int] | None = None,
        columns: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Records as a DataFrame, one row per (step, source, layer, channel), in that order.

        Columns: ``step, source, layer, channel, count, mean, var, min, max,
        nonfinite, zero_frac``, the quantiles ``q0.01 … q0.99`` and the bin means
        ``binmean_00 …`` (NaN for channels outside a layer's sketched subset).

        Args:
            source: ``"train"``, ``"probe"``, ``"probe_a"`` or ``"probe_b"``; None keeps all.
            layers: a layer name or a list of them; None keeps all.
            steps: a step, an iterable of steps (a ``range`` too); None keeps all.
            columns: the columns to read besides ``step, source, layer, channel``; None reads all.

        Filters are pushed down to the Parquet parts: only the row groups that
        can hold the layers and steps asked for are read, so one layer of a long
        run is read in a fraction of the time and memory of the whole. The whole
        run, unfiltered, is built once per source until new records arrive; each
        call returns a shallow copy (copy-on-write), so changing it leaves the
        run's copy intact.
        """
        if source is not None:
            check_choice("source", source, SOURCES)
        wanted = None if layers is None else self._known_layers(layers)
        filters = [] if source is None else [pc.field("source") == source]
        if wanted is not None:
            filters.append(pc.field("layer").isin(wanted))
        if steps is not None:
            filters.append(steps_filter(steps))
        if columns is not None:
            columns = checked_columns(columns)
        paths = self._readable_parts()
        if layers is None and steps is None and columns is None:
            return self._whole(source, paths)
        expression = functools.reduce(operator.and_, filters) if filters else None
        empty = SCHEMA.empty_table().select(columns or SCHEMA.names)
        if wanted == []:
            return self._to_frame(empty)
        tables = [
            store.read_part(path, self._run_id, SCHEMA, columns=columns, filters=expression, layers=wanted)
            for path in paths
        ]
        return self._to_frame(pa.concat_tables([empty, *tables]))

    def sources(self) -> pd.DataFrame:
        """Per source: recorded ``steps``, ``first step``, ``last step`` and ``rows``; only two columns are read."""
        tables = [store.read_part(path, self._run_id, SCHEMA, columns=["step", "source"])
                  for path in self._readable_parts()]
        table = pa.concat_tables([SCHEMA.empty_table().select(["step", "source"]), *tables])
        table = table.set_column(1, "source", table["source"].cast(pa.string()))
        grouped = table.group_by("source").aggregate(
            [("step", "count_distinct"), ("step", "min"), ("step", "max"), ("step", "count")])
        frame = grouped.to_pandas().set_index("source").sort_index()
        frame.columns = [{"step_count_distinct": "steps", "step_min": "first step", "step_max": "last step",
                          "step_count": "rows"}[c] for c in frame.columns]
        return frame[["steps", "first step", "last step", "rows"]]

    def _known_layers(self, layers: str | Sequence[str]) -> list[str]:
        """``layers`` as a list of recorded layer names; an unknown one raises ValueError naming the valid ones."""
        names = [layers] if isinstance(layers, str) else list(layers) if isinstance(layers, Iterable) else [layers]
        if not all(isinstance(name, str) for name in names):
            raise TypeError(f"layers must be a layer name or a list of them, got {layers!r}")
        known = [layer["name"] for layer in self._meta["layers"]]
        unknown = [name for name in names if name not in known]
        if unknown:
            shown = ", ".join(known[:LAYERS_SHOWN]) + (f" and {len(known) - LAYERS_SHOWN} more" if len(known) > LAYERS_SHOWN else "")
            raise ValueError(f"no recorded layer {', '.join(map(repr, unknown))}; recorded layers: {shown} (run.layers lists them)")
        return names

    def _readable_parts(self) -> list[Path]:
        """The parts on disk after a flush, but a part about to be rewritten with the steps still buffered."""
        self.flush()
        paths = store.part_paths(self.directory)
        if self._pending:  # unwritten steps: their part may be on disk already, to be rewritten
            unfinished = store.part_path(self.directory, self._pending[0].seq, self._run_id)
            paths = [path for path in paths if path != unfinished]
        return paths

    def _whole(self, source: str | None, paths: list[Path]) -> pd.DataFrame:
        """Every record of ``source`` (None: all), kept until new parts arrive.

        A source's records are read part by part with the other sources' rows
        dropped as each part is read, so memory holds that source only.
        """
        key = (tuple(paths), len(self._meta["layers"]))
        if self._frames_key != key:
            self._frames, self._frames_key = {}, key
        if source not in self._frames:
            if source is not None and None in self._frames:
                every = self._frames[None]
                self._frames[source] = every[every["source"] == source].reset_index(drop=True)
            else:
                only = None if source is None else pc.field("source") == source
                tables = [store.read_part(path, self._run_id, SCHEMA, filters=only) for path in paths]
                self._frames[source] = self._to_frame(pa.concat_tables([SCHEMA.empty_table(), *tables]))
        return self._frames[source].copy(deep=False)

    def _to_frame(self, table: pa.Table) -> pd.DataFrame:
        """``table`` as a DataFrame with categorical layers in recording order, rows sorted by step, source, layer, channel."""
        frame = table.to_pandas()
        order = [layer["name"] for layer in self._meta["layers"]]
        frame["layer"] = pd.Categorical(frame["layer"].astype(str), categories=order)
        frame["source"] = frame["source"].astype(str)
        rows = np.lexsort((frame["channel"].to_numpy(), frame["layer"].cat.codes.to_numpy(),
                           frame["source"].to_numpy(), frame["step"].to_numpy()))
        if (rows != np.arange(len(rows))).any():
            frame = frame.take(rows).reset_index(drop=True)
        return frame

    def curves(self) -> pd.DataFrame:
        """Logged training curves: one row per :meth:`log` call, columns ``step`` and the names."""
        return pd.DataFrame(store.read_curves(self.directory))

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Copy the run to ``path`` (a new directory) and return it.

        With ``overwrite=True`` a covshift run already at ``path`` is replaced; a
        directory holding anything else is never deleted. Steps that the run's own
        directory could not take (disk full) are written to the copy.
        """
        self.flush()
        target = Path(path)
        if target.resolve() == self.directory.resolve():
            return target
        if target.exists() and any(target.iterdir()):
            if not overwrite:
                raise FileExistsError(f"cannot save run to {target}: the directory is not empty "
                                      "(pass overwrite=True to replace a run saved there)")
            if not (target / store.META_FILE).is_file() or target.resolve() in self.directory.resolve().parents:
                raise FileExistsError(f"cannot overwrite {target}: it holds no covshift run (or holds this one)")
            shutil.rmtree(target)
        target.mkdir(parents=True, exist_ok=True)
        store.write_meta(target, self._meta)
        for item in [store.CURVES_FILE, *[p.name for p in store.part_paths(self.directory)]]:
            if (self.directory / item).exists():
                shutil.copy2(self.directory / item, target / item)
        if self._pending:
            part = store.part_path(target, self._pending[0].seq, self._run_id)
            store.write_part(part, records_to_table(self._pending), self._run_id)
        return target

    def __repr__(self) -> str:
        return f"Run({str(self.directory)!r}, layers={len(self._meta['layers'])})"

    def _repr_html_(self) -> str:
        """Notebook display: name, store path, steps per source and layers."""
        from covshift.store.display import run_html

        return run_html(self)


def load(path: str | Path) -> Run:
    """Open a stored run directory.

    Raises:
        covshift.store.RunFileError: the directory or one of its files is missing or corrupted.
    """
    return Run(path)
