"""`CovshiftCallback` for a Hugging Face ``Trainer``: record training, log drift through ``Trainer.log``.

Needs ``transformers`` (``pip install covshift[huggingface]``)::

    trainer = transformers.Trainer(model, args, train_dataset=ds, callbacks=[CovshiftCallback(every=10)])
    trainer.train()
    run = covshift.load(f"{args.output_dir}/covshift")
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import transformers

import covshift
from covshift.faults import CovshiftWarning
from covshift.integrations._scalars import (
    STEP_SCALAR,
    DriftScalars,
    check_attach_options,
    unique_directory,
)

#: Directory of the run inside ``args.output_dir``.
RUN_DIRECTORY = "covshift"
_EVALUATION_PREFIXES = ("eval_", "test_", "predict_")


class CovshiftCallback(transformers.TrainerCallback):
    """Records the inputs of the model's layers while a ``Trainer`` trains, and logs their drift.

    - Steps: covshift's step ``n`` holds every training forward that ran while
      ``state.global_step == n``, i.e. the micro-batches of the update the
      Trainer counts as its step ``n + 1`` (``global_step`` is 1-based: it is 1
      after the first update). Gradient accumulation gives one record per
      update; a resumed training goes on numbering from its ``global_step``.
    - Evaluation runs in eval mode and is not recorded.
    - Logging: when the Trainer logs its training loss (every ``logging_steps``),
      the drift of the newest recorded step is added to that log as
      ``covshift/<metric>/<layer>``, ``covshift/<metric>/layer_mean`` and
      ``covshift/step`` (covshift's step, one less than the log's ``step``), so
      ``state.log_history`` and every ``report_to`` integration (TensorBoard,
      W&B …) receive it with the loss. The callback moves itself to the front of
      the Trainer's callbacks at the start of training so that those
      integrations see the values it adds. Only that step's drift is computed.
    - Under ``torchrun`` (or ``accelerate launch``) the process group exists
      when training begins, so every rank attaches to it and each record is the
      union of all ranks' micro-batches, written by world process zero alone;
      on the other ranks :attr:`run` has no directory.
    - Training resumed from a checkpoint (``train(resume_from_checkpoint=...)``)
      with the ``store=`` of the first goes on with that run
      (``attach(..., resume=True)``): the steps recorded after the checkpoint
      are replaced, and a run of another model or other settings is refused
      before training starts.
    - The run is stored in ``<output_dir>/covshift`` (``covshift_1`` … when
      taken) unless ``store=`` says where; at the end of training the hooks are
      removed and :attr:`run` holds it. (The Trainer has no exception event: if
      training raises, call ``callback.detach()``; the run on disk keeps every
      flushed step either way.)

    Args:
        metric: drift metric(s) to log (see :func:`covshift.drift`).
        reference: drift reference: ``"initial"``, ``"previous"``, a step or ``"rolling:K"``.
        per_layer: log each layer's drift; False logs only ``layer_mean`` (a model of
            hundreds of layers makes hundreds of charts, and long console lines
            where logs are printed).
        log: False records without logging drift (export it afterwards with
            :func:`covshift.to_tensorboard`).
        attach_options: passed to :func:`covshift.attach` (``layers``, ``every``,
            ``sample_size``, ``store``, ``name``, ``channel_dim`` …); not ``optimizer``.
    """

    def __init__(
        self,
        *,
        metric: str | Sequence[str] = "wasserstein",
        reference: str | int = "initial",
        per_layer: bool = True,
        log: bool = True,
        **attach_options: Any,
    ) -> None:
        check_attach_options(attach_options, "Trainer")
        self.attach_options = attach_options
        self.scalars = DriftScalars(metric, reference, per_layer)
        self.log_drift = log
        self.tracker: covshift.Tracker | None = None
        self.run: covshift.Run | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs: Any) -> None:
        self.detach()  # a tracker left from an earlier train()
        self._move_to_front()
        options = dict(self.attach_options)
        if options.get("store") is None:
            main = state.is_world_process_zero
            options["store"] = unique_directory(Path(args.output_dir) / RUN_DIRECTORY) if main else None
        elif state.global_step > 0:  # train(resume_from_checkpoint=...): go on with the run in store=
            options.setdefault("resume", True)
        self.tracker = covshift.attach(model, optimizer=optimizer, **options)
        self.run = self.tracker.run
        self.tracker.set_step(state.global_step)
        self.scalars.last_step = None

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        # the update closed covshift's step global_step - 1; keep numbering with the Trainer even when the
        # optimizer skipped an update (mixed precision overflow): that update's forwards join the next record
        if self.tracker is not None and self.tracker.current_step != state.global_step:
            self.tracker.set_step(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs: Any) -> None:
        if not (self.log_drift and state.is_world_process_zero) or self.tracker is None or logs is None:
            return
        if any(key.startswith(_EVALUATION_PREFIXES) for key in logs):
            return  # an evaluation's log: drift goes with the training loss
        newest = self.scalars.newest(self.tracker.run)
        if newest is None or not newest[1]:
            return
        step, scalars = newest
        scalars[STEP_SCALAR] = step
        logs.update(scalars)
        history = state.log_history
        # Trainer.log stored a copy of this log in the history before the callbacks ran
        same = history and history[-1].get("step") == state.global_step
        if same and logs.keys() - scalars.keys() <= history[-1].keys():
            history[-1].update(scalars)

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        self.detach()

    def detach(self) -> covshift.Run | None:
        """Remove the hooks (the end of training does it) and return the run."""
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            self.run = tracker.detach()
        return self.run

    def _move_to_front(self) -> None:
        """Put this callback first in the calling Trainer's ``CallbackHandler``.

        The Trainer hands each callback the same ``logs`` dict in turn, and puts
        its ``report_to`` integrations before the user's callbacks: only values
        added before they run reach them. A callback is not given its handler,
        so it is found among the callers (``CallbackHandler.call_event``). While
        the handler iterates, moving the current callback from index i to 0 leaves
        the callbacks after it at their indices, so each still runs once.
        """
        frame = sys._getframe(1)
        for _ in range(8):
            if frame is None:
                break
            handler = frame.f_locals.get("self")
            if isinstance(handler, transformers.trainer_callback.CallbackHandler) and self in handler.callbacks:
                handler.callbacks.remove(self)
                handler.callbacks.insert(0, self)
                return
            frame = frame.f_back
        warnings.warn(
            "covshift's CovshiftCallback could not find the Trainer's callback handler: its drift reaches "
            "state.log_history, but report_to integrations placed before it will not see it",
            CovshiftWarning,
            stacklevel=3,
        )
