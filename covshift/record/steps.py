"""Each step's records handed to the run: a layer's calls merged, the ranks' records gathered (rank 0 writes),
new layers described, the step finalized, then checked for alerts."""

from __future__ import annotations

from typing import Any

from covshift.record import distributed
from covshift.record.alerts import AlertMonitor
from covshift.record.live import LiveLog
from covshift.store.writer import ALERTS_TABLE
from covshift.summary.summarize import Partial, merge


class StepWriter:
    """Writes a :class:`~covshift.record.tracker.Tracker`'s steps into its run (the tracker's lock held).

    Reads the tracker's layer kinds, axes, faults and ranks; counts the steps stored with training records.
    """

    def __init__(self, tracker: Any, alerts: AlertMonitor | None, live: LiveLog | None = None) -> None:
        self._tracker = tracker  # the Tracker that owns it
        self.alerts = alerts
        self.live = live
        self.described: set[str] = set()  # layers whose kind the run has
        self.train_steps = 0  # steps stored with training records
        self.first_train_step: int | None = None

    def write(self, step: int, partials: dict[tuple[str, str], list[Partial]]) -> None:
        """Hand one step's records to the run, the calls of each layer merged (lock held).

        Every part is guarded but the exchange between ranks, whose failure (a rank died) is the user's to see.
        """
        doubts = self._tracker._axes.doubts_message(exclude=self._tracker._same.found)
        if doubts is not None:
            self._tracker._faults.warn_once(f"axes at {step}", doubts)
        merged: dict[tuple[str, str], Partial] = {}
        with self._tracker._faults.guard("merging a step", self._tracker.run.directory):
            merged = self.merge_calls(partials)
        # -- torch.distributed: on a recorded step every rank sends its records, rank 0 merges and writes them
        if self._tracker._ranks is not None:
            if self._tracker._scheduled(self._tracker.schedule, step) or (self._tracker._probe is not None and self._tracker._scheduled(self._tracker._probe.schedule, step)):
                try:
                    pooled = self._tracker._ranks.gather(
                        step, {} if self._tracker._faults.stopped else merged, self._tracker._kinds,
                        self._tracker._summarizer.sample_size, self._tracker._rank_settings(),
                    )
                except distributed.RanksDisagree as err:
                    self._tracker._faults.stopped = True
                    self._tracker._faults.warn_once(
                        "ranks",
                        f"the {self._tracker._ranks.size} ranks of this job do not record alike, so their records "
                        f"cannot be merged into one run: {err}. Nothing of step {step} is stored and recording "
                        "stops on every rank; training goes on. Attach alike on every rank and take the same steps",
                        stacklevel=7,
                    )
                    return
                with self._tracker._faults.guard("merging the ranks' records", self._tracker.run.directory):
                    merged = self.merge_calls(pooled)  # rank 0: every rank's records, merged as calls are
                    self._tracker._called.update(name.removesuffix(":output") for _, name in merged)
            if not self._tracker._ranks.is_writer or self._tracker._faults.stopped:
                return
        # --
        if not merged or self._tracker._faults.stopped:
            return
        finalized = None
        with self._tracker._faults.guard("storing a step", self._tracker.run.directory):
            for (source, name), partial in merged.items():
                if name not in self.described:
                    self.described.add(name)
                    kind, dim = self._tracker._kinds[name]
                    self._tracker.run.add_layer(name, kind, partial.count.shape[0], dim)
                self._tracker.run.append(step, source, name, partial)
            finalized = self._tracker.run.end_step()
            if any(source == "train" for source, _ in merged):
                self.train_steps += 1
                if self.first_train_step is None:
                    self.first_train_step = step
        if self.alerts is not None and finalized is not None:
            self._check_alerts(finalized)

    def _check_alerts(self, finalized: Any) -> None:
        """Alerts of a finalized step: stored in the run, then handed to ``on_alert`` (which may raise: the user's
        ``"raise"`` or their own function reach the training loop, as they asked)."""
        alerts = []
        with self._tracker._faults.guard("checking alerts", self._tracker.run.directory):
            record = finalized.record
            alerts = self.alerts.observe(finalized.keys, record.stats, record.binmeans, record.sketched)
            if alerts:
                self._tracker.run.append_table(ALERTS_TABLE, [alert.as_row() for alert in alerts])
            if self.live is not None:
                self.live.write(finalized.keys[0][0], self.alerts.values, alerts)
        for alert in alerts:
            self.alerts.deliver(alert)

    def merge_calls(self, partials: dict[tuple[str, str], list[Partial]]) -> dict[tuple[str, str], Partial]:
        """Each record's calls (or ranks) in one step merged into one partial; a channel count that varies
        skips the record, with a warning."""
        merged = {}
        for (source, name), parts in partials.items():
            if name in self._tracker._same.found:
                continue
            channels = sorted({part.count.shape[0] for part in parts})
            if len(channels) > 1:
                self._tracker._unrecordable.setdefault(name, f"saw inputs with {channels} channels in one step")
                self._tracker._faults.skip(
                    name,
                    f"layer {name!r} saw inputs with {channels} channels in one step; its calls are merged "
                    "into one record, so they need the same channel count (set channel_dim for it)",
                )
            elif name not in self._tracker._faults.skipped:
                merged[(source, name)] = merge(parts)
        return merged

