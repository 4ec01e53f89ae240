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
    ran_training: bool,
    model: str,
) -> list[tuple[str, str]]:
    """What a detached run lacks that the user would not otherwise notice, as (key, message) pairs:
    no training forward at all, no or one recorded step, selected layers never called."""
    messages = []
    if not ran_training:
        messages.append((
            "nothing",
            f"no training step was recorded: the {model} it was attached to never ran a training-mode "
            "forward. Is the model in eval mode (from_pretrained() returns it so: call model.train()), or "
            "does the training step call a submodule directly (attach to that submodule)?",
        ))
    elif recorded == 0:
        messages.append((
            "nothing",
            f"no training step was recorded in {steps} steps: forwards inside torch.compile or torch.func "
            "transforms, and inputs that are not floating point, record nothing",
        ))
    elif recorded == 1:
        advice = "train longer" if schedule.records(1) else f"record more often ({schedule} now) or train longer"
        messages.append((
            "short",
            f"only 1 training step was recorded (step {first_recorded} of {steps}): drift needs at "
            f"least 2. To see drift, {advice}",
        ))
    never = [name for name in layers if name not in called]
    if recorded and never:
        shown = ", ".join(repr(name) for name in never[:NAMES_SHOWN])
        more = f" and {len(never) - NAMES_SHOWN} more" if len(never) > NAMES_SHOWN else ""
        messages.append((
            "never called",
            f"{len(never)} of {len(layers)} selected layers were never called on a recorded step, so they "
            f"have no records: {shown}{more}. A layer used through a functional path (as "
            "MultiheadAttention uses its out_proj) never runs its own forward",
        ))
    return messages
