"""`CovshiftCallback` for a Lightning ``Trainer``: record a fit, log its drift through the trainer's loggers.

Needs ``lightning`` (``pip install covshift[lightning]``)::

    trainer = lightning.Trainer(callbacks=[CovshiftCallback(every=10)], accumulate_grad_batches=2)
    trainer.fit(module, loader)
    run = trainer.callbacks[0].run  # also stored in <trainer.log_dir>/covshift
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

import covshift
from covshift import schedule
from covshift.integrations._scalars import (
    STEP_SCALAR,
    DriftScalars,
    check_attach_options,
    unique_directory,
)

#: Directory of the run inside the trainer's log dir.
RUN_DIRECTORY = "covshift"


class CovshiftCallback(pl.Callback):
    """Records the inputs of a LightningModule's layers during ``trainer.fit`` and logs their drift.

    - Attaches in ``on_train_start`` (the optimizers exist, a resumed ``global_step``
      is restored, the sanity check is over) to the LightningModule, so layers
      inside ``self.net`` are found whether ``training_step`` calls ``self(x)`` or
      ``self.net(x)``. Steps are the optimizer's steps: with
      ``accumulate_grad_batches=k`` the k micro-batches of an update form one
      record, and covshift's step ``n`` is the update made while
      ``trainer.global_step == n`` (so a resumed fit goes on numbering).
    - Sanity checks, validation, test and predict are not recorded: they run
      in eval mode, and the tracker only exists between ``on_train_start`` and
      the end of the fit.
    - Every ``log_every_n_steps`` updates (the trainer's own setting by default)
      it logs through each of ``trainer.loggers`` (TensorBoard, W&B, CSV …) the
      drift of the newest recorded step: ``covshift/<metric>/<layer>`` and
      ``covshift/<metric>/layer_mean``, at the trainer's step (where Lightning logs
      the module's own metrics of that update), with ``covshift/step`` the recorded
      step the drift is of; and once more at the end of training. Only that step's
      drift is computed.
    - The run is stored in ``<trainer.log_dir>/covshift`` (``covshift_1`` … when
      taken) unless ``store=`` says where; after the fit (or an exception) the
      hooks are gone and :attr:`run` holds it. A fit resumed from a checkpoint
      (``fit(..., ckpt_path=...)``) with the ``store=`` of the first goes on with
      that run (``attach(..., resume=True)``): the steps recorded after the
      checkpoint are replaced, and a run of another model or other settings is
      refused before training starts.
    - Several processes (``strategy="ddp"``, FSDP …): the process group exists at
      ``on_train_start``, so every rank attaches to it and each record is the
      union of all ranks' batches, written by global rank zero alone; on the
      other ranks :attr:`run` has no directory (read it where
      ``trainer.is_global_zero``).

    Args:
        metric: drift metric(s) to log (see :func:`covshift.drift`).
        reference: drift reference: ``"initial"``, ``"previous"``, a step or ``"rolling:K"``.
        per_layer: log each layer's drift; False logs only ``layer_mean`` (a model of
            hundreds of layers makes hundreds of charts, and long console lines
            where logs are printed).
        log_every_n_steps: log every this many optimizer steps; None: the
            trainer's ``log_every_n_steps``; 0: never.
        probe: a fixed batch for :meth:`covshift.Tracker.probe`: a tensor, a tuple
            of positional arguments, a dict of keyword arguments, or a function
            of the half (0 or 1). Tensors are moved to the module's device. The
            probe runs as each probe step opens (at the update before it; the first
            at the first training batch, under its autocast state), whether
            ``training_step`` calls ``self(...)`` or a submodule; so the step the
            last update opens holds the probe of the final weights, one probe step
            more than training (``max_steps=50``: probe steps 0 … 50).
        probe_every: None (default) to probe at the steps that record training; else an int N or "log".
        module: attach to this submodule of the LightningModule (an attribute
            path such as ``"net"``) instead of the whole module.
        attach_options: passed to :func:`covshift.attach` (``layers``, ``every``,
            ``sample_size``, ``store``, ``name``, ``channel_dim`` …); not ``optimizer``.
    """

    def __init__(
        self,
        *,
        metric: str | Sequence[str] = "wasserstein",
        reference: str | int = "initial",
        per_layer: bool = True,
        log_every_n_steps: int | None = None,
        probe: Any = None,
        probe_every: int | str | None = None,
        module: str | None = None,
        **attach_options: Any,
    ) -> None:
        check_attach_options(attach_options, "trainer")
        if probe_every is not None:
            schedule.parse(probe_every)  # a bad value is refused here, not when training starts
        if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 0):
            raise ValueError(f"log_every_n_steps must be an int >= 0 or None, got {log_every_n_steps!r}")
        self.attach_options = attach_options
        self.log_every_n_steps = log_every_n_steps
        self.probe = probe
        self.probe_every = probe_every
        self.module = module
        self.scalars = DriftScalars(metric, reference, per_layer)
        self.tracker: covshift.Tracker | None = None
        self.run: covshift.Run | None = None
        self._last_global_step = -1

    # -- lifecycle ---------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()  # a tracker left from an earlier fit
        options = dict(self.attach_options)
        if options.get("store") is None:
            options["store"] = self.default_store(trainer)
        elif trainer.ckpt_path is not None or trainer.global_step > 0:  # a resumed fit goes on with its run
            options.setdefault("resume", True)
        model = pl_module.get_submodule(self.module) if self.module else pl_module
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        kwargs = {"optimizer": optimizer} if optimizer is not None else {}
        self.tracker = covshift.attach(model, **kwargs, **options)
        self.run = self.tracker.run
        self.tracker.set_step(trainer.global_step)
        self._last_global_step = trainer.global_step
        self.scalars.last_step = None
        if self.probe is not None:
            self._start_probe(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self.tracker is None or trainer.global_step == self._last_global_step:
            return  # no optimizer step since the last batch (accumulating)
        self._last_global_step = trainer.global_step
        if len(trainer.optimizers) == 1 and self.tracker.current_step != trainer.global_step:
            self.tracker.set_step(trainer.global_step)  # e.g. an update the AMP scaler skipped
        interval = self._interval(trainer)
        if interval and trainer.global_step % interval == 0:
            self._log(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tracker is not None and self._interval(trainer):
            self.tracker.flush()
            self._log(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    # -- helpers -----------------------------------------------------------------
    @staticmethod
    def default_store(trainer: pl.Trainer) -> Path | None:
        """``<trainer.log_dir>/covshift`` (a new name if taken) on the global-zero process; None elsewhere."""
        root = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: every process asks
        if not trainer.is_global_zero:
            return None
        return unique_directory(Path(root) / RUN_DIRECTORY)

    def _interval(self, trainer: pl.Trainer) -> int:
        return trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps

    def _log(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:  # Lightning's loggers write on global zero only
            return
        newest = self.scalars.newest(self.tracker.run)
        if newest is None or not newest[1]:
            return
        step, scalars = newest
        # at the trainer's step, as Lightning logs the module's own metrics of this update; the drift's own step beside
        scalars = {**scalars, STEP_SCALAR: float(step)}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step - 1)

    def _start_probe(self, pl_module: pl.LightningModule) -> None:
        from lightning.pytorch.utilities import move_data_to_device

        probe = self.probe
        if callable(probe):
            self.tracker.probe(probe, every=self.probe_every)
            return
        probe = move_data_to_device(probe, pl_module.device)
        if isinstance(probe, tuple):
            self.tracker.probe(*probe, every=self.probe_every)
        elif isinstance(probe, dict):
            self.tracker.probe(**probe, every=self.probe_every)
        else:
            self.tracker.probe(probe, every=self.probe_every)

    def _detach(self) -> None:
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            self.run = tracker.detach()
