"""How covshift reports its own faults and silences: once, as warnings, never as errors in the user's loop."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

from covshift.schedule import Schedule

#: Layer names listed in one warning before "and N more".
NAMES_SHOWN = 8


#: What a run without any record says: why that happens and what to do.
EMPTY_RUN = (
    "the run holds no records: nothing was recorded while covshift was attached. Did the model run a "
    "training-mode forward (model.train()) between attach() and detach()? Did training reach a step the "
    "schedule records (every=N records steps 0, N, 2N, …; resumed runs keep their step numbers)? The "
    "warning covshift gave at detach() names what it saw."
)


class CovshiftWarning(UserWarning):
    """Something covshift could not record or store; the user's training is unaffected."""


class Faults:
    """What went wrong so far: warnings said (once each), records skipped, and whether recording stopped."""

    def __init__(self) -> None:
        self.warned: set[str] = set()
        self.skipped: set[str] = set()  # records that faulted: no longer taken
        self.stopped = False  # a fault outside any one record: nothing more is taken
        self.stop_reason: str | None = None  # what covshift was doing when a fault stopped recording

    def warn_once(
        self, key: str, message: str, stacklevel: int = 4, category: type[CovshiftWarning] = CovshiftWarning
    ) -> None:
        """Warn ``covshift: message`` unless a warning under ``key`` was already given."""
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(f"covshift: {message}", category, stacklevel=stacklevel)

    def skip(self, name: str, message: str) -> None:
        """Stop taking record ``name`` after a fault of its own, saying so once."""
        self.skipped.add(name)
        self.warn_once(name, f"{message}; it is no longer recorded")

    @contextlib.contextmanager
    def guard(self, doing: str, store: Path | None) -> Iterator[None]:
        """Turn a fault while ``doing`` into one warning; recording stops, training goes on.

        ``store``: the run's directory, named in the warning (None on a rank that writes none).
        """
        try:
            yield
        except Exception as err:  # noqa: BLE001 - a fault of covshift's must not reach the user's loop
            if not self.stopped:
                self.stop_reason = doing
            self.stopped = True
            kept = f" Steps written before are kept in {store}" if store is not None else ""
            self.warn_once(
                "stopped",
                f"{doing} failed ({type(err).__name__}: {err}); covshift stops recording here and "
                f"training goes on.{kept}",
                stacklevel=5,
            )


def gap_messages(
    *,
    layers: list[str],
    called: set[str],
    recorded: int,
    first_recorded: int | None,
    steps: int,
    schedule: Schedule,
    forwards: str,
    model: str,
    stopped: str | None = None,
    unrecordable: dict[str, str] | None = None,
    openers: list[str] | None = None,
    compiled_recorded: bool = True,
) -> list[tuple[str, str]]:
    """What a detached run lacks that the user would not otherwise notice, as (key, message) pairs:
    no recorded step (and the cause that happened), one recorded step, selected layers never
    called, steps counted at calls of several submodules.

    Args:
        forwards: the training forwards covshift saw: ``"train"`` (some), ``"eval"`` (only
            eval-mode ones) or ``"none"`` (none).
        stopped: what covshift was doing when a fault stopped recording (None: none did).
        unrecordable: layers called with nothing it could summarize, and why.
        openers: in per-forward mode, the modules whose calls opened steps ("" for the model).
        compiled_recorded: whether this torch lets covshift record inside torch.compile.
    """
    unrecordable = unrecordable or {}
    messages = []
    if recorded == 0:
        messages.append(("nothing", _nothing(
            layers=layers, called=called, steps=steps, forwards=forwards, model=model, stopped=stopped,
            unrecordable=unrecordable, compiled_recorded=compiled_recorded,
        )))
    elif recorded == 1:
        following = None
        if first_recorded is not None:
            ahead = range(first_recorded + 1, first_recorded + 10**5)
            try:
                following = next((k for k in ahead if schedule.records(k)), None)
            except Exception:  # noqa: BLE001 - a user's schedule that raises: the plain advice will do
                following = None
        if following is not None and following > steps:  # e.g. a run resumed late on the log-spaced schedule
            advice = (f"train to step {following}, the next one the schedule records ({schedule} now), or record "
                      "more often (every=N)")
        else:
            advice = "train longer" if schedule.records(1) else f"record more often ({schedule} now) or train longer"
        messages.append((
            "short",
            f"only 1 training step was recorded (step {first_recorded} of {steps}): drift needs at "
            f"least 2. To see drift, {advice}",
        ))
    never = [name for name in layers if name not in called]
    if recorded and never:
        messages.append((
            "never called",
            f"{len(never)} of {len(layers)} selected layers were never called on a recorded step, so they "
            f"have no records: {_names(never)}. A layer used through a functional path (as "
            "MultiheadAttention uses its out_proj) never runs its own forward",
        ))
    if openers and len(openers) > 1:
        shown = _names([name or model for name in openers])
        messages.append((
            "openers",
            f"steps were counted at each training-mode call of {shown}: the {model}'s own forward did not "
            "run every time, so the outermost call of a submodule counted as a step, and a training step "
            "that calls several of them counted several. Attach with optimizer= for one step per update",
        ))
    return messages


def _nothing(
    *, layers: list[str], called: set[str], steps: int, forwards: str, model: str, stopped: str | None,
    unrecordable: dict[str, str], compiled_recorded: bool,
) -> str:
    """Why no training step was recorded: the cause that happened, first one found."""
    if stopped is not None:
        return (f"no training step was recorded: {stopped} failed before the first recorded step ended, and "
                "covshift stopped recording there (the warning above gives the error)")
    if forwards == "none":
        return (
            f"no training step was recorded: covshift saw no forward of the {model} or of its watched "
            "submodules; is this the model your training step calls?"
            + ("" if compiled_recorded else " (forwards inside torch.compile are recorded with torch 2.4 or later)")
        )
    if forwards == "eval":
        return (
            f"no training step was recorded: the {model} it was attached to never ran a training-mode "
            "forward, only eval-mode ones. from_pretrained() returns a model in eval mode: call model.train()"
        )
    got = {name: unrecordable[name] for name in layers if name in unrecordable}
    if got and set(got) >= called:
        listed = ", ".join(f"{name!r} ({what})" for name, what in list(got.items())[:NAMES_SHOWN])
        more = f" and {len(got) - NAMES_SHOWN} more" if len(got) > NAMES_SHOWN else ""
        return f"no training step was recorded: no selected layer that was called could be summarized: {listed}{more}"
    return (
        f"no training step was recorded in {steps} steps: none of the {len(layers)} selected layers was "
        "called on a recorded step"
    )


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")
