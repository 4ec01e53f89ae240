"""`Run`: the recorded summaries of one training run, read back (filtered `stats()`, `save`, `load`)."""

from __future__ import annotations

import functools
import operator
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from covshift.store import files as store
from covshift.store import manifest
from covshift.checks import check_choice
from covshift.columns import SOURCES
from covshift.store.records import SCHEMA, SCHEMAS, checked_columns, records_to_table, steps_filter
from covshift.store.writer import ALERTS_TABLE, NOTICES_TABLE, RunWriter

#: Layer names an error message lists before "and N more".
LAYERS_SHOWN = 12


class Run(RunWriter):
    """Summaries of one training run: a directory of Parquet parts plus a small buffer (:class:`RunWriter`).

    Trackers create runs; :func:`load` opens stored ones. Reading sees every flushed
    step and the steps still buffered.
    """

    _meta_key: tuple | None = None  # meta.json's (inode, size, mtime) when a stored run last read it

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
        self._refresh()
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
            if isinstance(steps, Iterable) and not isinstance(steps, range):
                steps = list(steps)  # read twice: for the filter and to choose parts
            filters.append(steps_filter(steps))
        if columns is not None:
            columns = checked_columns(columns)
        parts = self._parts()
        if layers is None and steps is None and columns is None:
            return self._whole(source, parts)
        expression = functools.reduce(operator.and_, filters) if filters else None
        empty = SCHEMA.empty_table().select(columns or SCHEMA.names)
        if wanted == []:
            return self._to_frame(empty)
        span = _step_span(steps)
        tables = [
            self._read(path, entry, columns=columns, filters=expression, layers=wanted)
            for path, entry in parts
            if entry is None or entry.holds(wanted, span)
        ]
        return self._to_frame(_concat([empty, *tables]))

    def sources(self) -> pd.DataFrame:
        """Per source: recorded ``steps``, ``first step``, ``last step`` and ``rows``; only two columns are read."""
        tables = [self._read(path, entry, columns=["step", "source"]) for path, entry in self._parts()]
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
        if unknown and self._refresh():
            known = [layer["name"] for layer in self._meta["layers"]]
            unknown = [name for name in names if name not in known]
        if unknown:
            shown = ", ".join(known[:LAYERS_SHOWN]) + (f" and {len(known) - LAYERS_SHOWN} more" if len(known) > LAYERS_SHOWN else "")
            raise ValueError(f"no recorded layer {', '.join(map(repr, unknown))}; recorded layers: {shown} (run.layers lists them)")
        return names

    def _parts(self) -> list[tuple[Path, manifest.PartEntry | None]]:
        """The run's parts after a flush, each with its manifest entry (None: a run written before manifests,
        whose parts are read as they are). Files named like parts that the manifest does not list are
        refused (another run's, copies) or, when a crash left them, not read."""
        self.flush()
        self._refresh()
        entries = self._entries if self._writable else manifest.read(self.directory, self._run_id)
        if entries is None:
            paths = store.part_paths(self.directory)
            manifest.check_copies(paths)
            return [(path, None) for path in paths]
        manifest.check_unlisted(self.directory, self._run_id, entries)
        return [(self.directory / entry.name, entry) for entry in entries]

    def _refresh(self) -> bool:
        """A stored run may still be recording in another process: re-read its ``meta.json`` (the layers
        recorded since) when the file changed. Whether it was re-read."""
        if self._writable:
            return False
        key = store.meta_stamp(self.directory)
        if key is None or key == self._meta_key:
            return False
        self._meta, self._meta_key = store.read_meta(self.directory), key
        return True

    def _read(self, path: Path, entry: manifest.PartEntry | None, **options) -> pa.Table:
        """One part's rows, its footer checked against ``entry`` first; ``layers``: the row groups that can hold them."""
        if entry is None:
            return store.read_part(path, self._run_id, SCHEMAS, **options)
        groups = entry.row_groups(options.pop("layers", None))
        return store.read_part(path, self._run_id, SCHEMAS, footer=entry.expected, groups=groups, **options)

    def _whole(self, source: str | None, parts: list[tuple[Path, manifest.PartEntry | None]]) -> pd.DataFrame:
        """Every record of ``source`` (None: all), kept until new parts arrive.

        A source's records are read part by part with the other sources' rows
        dropped as each part is read, so memory holds that source only.
        """
        key = (tuple(parts), len(self._meta["layers"]))
        if self._frames_key != key:
            self._frames, self._frames_key = {}, key
        if source not in self._frames:
            if source is not None and None in self._frames:
                every = self._frames[None]
                self._frames[source] = every[every["source"] == source].reset_index(drop=True)
            else:
                only = None if source is None else pc.field("source") == source
                tables = [self._read(path, entry, filters=only) for path, entry in parts]
                self._frames[source] = self._to_frame(_concat([SCHEMA.empty_table(), *tables]))
        return self._frames[source].copy(deep=False)

    def _to_frame(self, table: pa.Table) -> pd.DataFrame:
        """``table`` as a DataFrame with categorical layers in recording order, rows sorted by step, source, layer, channel."""
        frame = table.to_pandas()
        names = frame["layer"].astype(str)
        order = [layer["name"] for layer in self._meta["layers"]]
        order += sorted(set(names.unique()) - set(order))  # from what was read, never NaN for a layer meta lacks
        frame["layer"] = pd.Categorical(names, categories=order)
        frame["source"] = frame["source"].astype(str)
        rows = np.lexsort((frame["channel"].to_numpy(), frame["layer"].cat.codes.to_numpy(),
                           frame["source"].to_numpy(), frame["step"].to_numpy()))
        if (rows != np.arange(len(rows))).any():
            frame = frame.take(rows).reset_index(drop=True)
        return frame

    def table(self, name: str) -> pd.DataFrame | None:
        """The side table ``name`` that a measurement stored with :meth:`append_table` (None: there is none).

        A last row cut short by a crash is dropped.
        """
        path = store.table_path(self.directory, name)
        return pd.DataFrame(store.read_jsonl(path)) if os.path.lexists(path) else None  # not a regular file: refused

    def alerts(self) -> pd.DataFrame:
        """The alerts raised while the run was recorded (``attach(..., on_alert=...)``), one row each:
        ``step, layer, kind, metric, value, floor, ratio``; empty when there were none."""
        table = self.table(ALERTS_TABLE)
        columns = ["step", "layer", "kind", "metric", "value", "floor", "ratio"]
        return pd.DataFrame(columns=columns) if table is None else table[columns]

    def notices(self) -> list[str]:
        """The notices stored with the run (:meth:`add_notice`), in the order they were added."""
        table = self.table(NOTICES_TABLE)
        return [] if table is None else [str(text) for text in table["notice"]]

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
        parts = self._parts()
        target.mkdir(parents=True, exist_ok=True)
        store.write_meta(target, self._meta)
        for item in [store.CURVES_FILE, *[path.name for path, _ in parts]]:
            if (self.directory / item).exists():
                shutil.copy2(self.directory / item, target / item)
        entries = [entry for _, entry in parts if entry is not None]
        if self._pending:
            seqs = (self._pending[0].seq, self._pending[-1].seq)
            part = store.part_path(target, seqs[0], self._run_id)
            table = records_to_table(self._pending)
            entries.append(manifest.describe(part.name, *store.write_part(part, table, self._run_id), table, seqs))
        if entries or not parts:  # a run written before manifests is copied as it is
            manifest.write(target, self._run_id, entries)
        return target

    def __repr__(self) -> str:
        return f"Run({str(self.directory)!r}, layers={len(self._meta['layers'])})"

    def _repr_html_(self) -> str:
        """Notebook display: name, store path, steps per source and layers."""
        from covshift.store.display import run_html

        return run_html(self)


def _concat(tables: list[pa.Table]) -> pa.Table:
    """``tables`` as one: quantiles and bin means in float64 if a part holds them so (float64 inputs)."""
    return pa.concat_tables(tables, promote_options="permissive")


def _step_span(steps: int | Iterable[int] | None) -> tuple[int, int] | list[int] | None:
    """The steps asked for, to choose parts by: a [start, stop) range of step 1, or a list."""
    if steps is None:
        return None
    if isinstance(steps, range) and steps.step == 1:
        return (steps.start, steps.stop)
    return [int(steps)] if isinstance(steps, (int, np.integer)) else [int(step) for step in steps]


def load(path: str | Path) -> Run:
    """Open a stored run directory.

    Raises:
        covshift.store.RunFileError: the directory or one of its files is missing or corrupted.
    """
    return Run(path)
