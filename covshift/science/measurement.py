"""What the measurements beside the records share: where their rows go, how they number steps and warn.

Added to a tracker (``tracker.add(measurement)``) a measurement numbers its steps
as the tracker does, stores its rows as a side table of the tracker's run (where
the report finds them) and warns through the tracker, once per cause, as a
:class:`~covshift.faults.CovshiftWarning`. On its own it counts the optimizer's
steps from 0 and appends its rows to ``<directory>/<table>.jsonl``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covshift.faults import CovshiftWarning
from covshift.record import context
from covshift.record.tracker import Tracker
from covshift.store.files import append_jsonl, table_path


class Measurement:
    """The base of :class:`~covshift.science.null_floor.NullFloor` and :class:`~covshift.science.gradient_ics.GradientICS`."""

    #: The side table (and, alone, the file ``<table>.jsonl``) its rows go to.
    table = ""
    #: The warning it says its faults with.
    warning: type[Warning] = CovshiftWarning

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, directory: str | Path | None) -> None:
        self.model, self.optimizer = model, optimizer
        self.directory = Path(directory) if directory is not None else None
        self.step = 0  # optimizer steps taken since it was made
        self._taking = 0  # the index of the step being taken (set by the optimizer pre-hook)
        self._tracker: Tracker | None = None
        self._warned: set[str] = set()

    def bind(self, tracker: Tracker) -> None:
        """Measure with ``tracker`` (called by :meth:`Tracker.add`): its steps, its run, its warnings."""
        if not isinstance(tracker, Tracker):
            raise TypeError(f"{type(self).__name__} is added to a covshift Tracker, got {type(tracker).__name__}")
        if context.unwrap_compiled(tracker.model) is not context.unwrap_compiled(self.model):
            raise ValueError(f"{type(self).__name__} measures another model than the tracker records")
        if self.optimizer is not None and tracker.optimizer is not context.unwrap_optimizer(self.optimizer):
            raise ValueError(f"{type(self).__name__} steps with an optimizer: attach the tracker with the same "
                             "one (covshift.attach(model, optimizer=opt)) so that both number the steps alike")
        if self.directory is not None and self.directory != Path(tracker.run.directory):
            raise ValueError(f"{type(self).__name__} added to a tracker stores its rows in the tracker's run; "
                             f"leave directory= out (got {self.directory})")
        self._tracker = tracker

    @property
    def bound(self) -> bool:
        """Whether it was added to a tracker."""
        return self._tracker is not None

    def _note_step(self, *_: Any) -> None:
        """Optimizer pre-hook: note the index of the step being taken (the tracker's open step, whichever
        of their hooks runs first; alone, the steps counted)."""
        self._taking = self.step if self._tracker is None else self._tracker.current_step

    def _count_step(self) -> int:
        """In an optimizer post-hook: the index of the step just taken."""
        self.step += 1
        return self._taking

    def _store(self, rows: list[dict[str, Any]]) -> None:
        if self._tracker is not None:
            self._tracker.run.append_table(self.table, rows)
        elif self.directory is not None:
            append_jsonl(table_path(self.directory, self.table), rows)

    def _warn(self, key: str, message: str) -> None:
        if self._tracker is not None:
            self._tracker.warn_once(f"{self.table}:{key}", message)
        elif key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, self.warning, stacklevel=4)
