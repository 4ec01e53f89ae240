"""Which training steps are recorded: pure functions of the step index.

Drift is fastest early in training, so the default schedule is dense early and
sparse late: step 0 and the steps nearest ``10 ** (k / per_decade)`` for
k = 0, 1, 2, … — every step up to 22, then ``per_decade`` steps per
decade (Cockpit's logarithmic schedule). Its record count grows with the
logarithm of the run's length: with 40 per decade, 88 records in 1,000 steps,
168 in 100,000, 208 in a million. ``every=N`` records steps 0, N, 2N, … as before.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

#: Records per decade of steps of the default schedule.
DEFAULT_PER_DECADE = 40


class Schedule:
    """A set of recorded step indices (0-based)."""

    def records(self, step: int) -> bool:
        """Whether ``step`` is recorded."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The schedule as stored in ``meta.json`` (``config.schedule``); :func:`from_config` reads it back.

        A schedule of your own may say more; by default it is named by its class.
        """
        return {"kind": "custom", "class": f"{type(self).__module__}.{type(self).__qualname__}"}

    def steps(self, stop: int) -> list[int]:
        """The recorded steps below ``stop``, ascending."""
        return [step for step in range(stop) if self.records(step)]


@dataclass(frozen=True)
class Every(Schedule):
    """Steps 0, n, 2n, …"""

    n: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"every must be a positive int, got {self.n!r}")

    def records(self, step: int) -> bool:
        return step % self.n == 0

    def describe(self) -> dict:
        return {"kind": "every", "every": self.n}

    def steps(self, stop: int) -> list[int]:
        return list(range(0, max(stop, 0), self.n))

    def __str__(self) -> str:
        return f"every={self.n}"


@dataclass(frozen=True)
class LogSpaced(Schedule):
    """Step 0 and the steps nearest ``10 ** (k / per_decade)``, k = 0, 1, 2, …: dense early, sparse late."""

    per_decade: int = DEFAULT_PER_DECADE

    def __post_init__(self) -> None:
        if isinstance(self.per_decade, bool) or not isinstance(self.per_decade, int) or self.per_decade < 1:
            raise ValueError(f"per_decade must be a positive int, got {self.per_decade!r}")

    def _point(self, k: int) -> int:
        return int(10 ** (k / self.per_decade) + 0.5)

    def records(self, step: int) -> bool:
        if step <= 0:
            return step == 0
        k = round(self.per_decade * math.log10(step))
        return any(self._point(j) == step for j in (k - 1, k, k + 1) if j >= 0)

    def steps(self, stop: int) -> list[int]:
        points, k = {0} if stop > 0 else set(), 0
        while (point := self._point(k)) < stop:
            points.add(point)
            k += 1
        return sorted(points)

    def describe(self) -> dict:
        return {"kind": "log", "per_decade": self.per_decade}

    def __str__(self) -> str:
        return f"log-spaced, {self.per_decade} per decade"


def parse(every: int | str | Schedule) -> Schedule:
    """The schedule ``attach(every=...)`` means: an int N (every N-th step), ``"log"`` or a :class:`Schedule`."""
    if isinstance(every, Schedule):
        return every
    if every == "log":
        return LogSpaced()
    if isinstance(every, numbers.Integral) and not isinstance(every, bool):  # numpy's ints too
        return Every(int(every))
    raise ValueError(f"every must be a positive int, 'log' or a covshift.schedule.Schedule, got {every!r}")


@dataclass(frozen=True)
class Described(Schedule):
    """A schedule of the user's own, as a stored run describes it: its code is not stored, so which steps
    it records is known from the run's records alone (``run.sources()``), not from here."""

    description: dict

    def records(self, step: int) -> bool:
        raise NotImplementedError(f"{self} was not stored with the run: its recorded steps are in run.sources()")

    def describe(self) -> dict:
        return dict(self.description)

    def __str__(self) -> str:
        return f"a schedule of the user's own ({self.description.get('class') or self.description.get('kind')})"

    def __hash__(self) -> int:
        return hash(repr(sorted(self.description.items(), key=str)))


def from_config(config: dict) -> Schedule:
    """The schedule a run was recorded with, from its ``meta["config"]`` (older runs: ``every``).

    Raises:
        ValueError: the config describes a schedule no covshift could have recorded with (``every=0``).
    """
    described = config.get("schedule")
    if isinstance(described, dict) and described.get("kind") == "log":
        return LogSpaced(described.get("per_decade"))
    if isinstance(described, dict) and described.get("kind") == "every":
        return Every(described.get("every"))
    if isinstance(described, dict):  # a schedule of the user's own
        return Described(described)
    every = config.get("every", 1)
    if isinstance(every, str) and every != "log":  # a user's schedule, stored before schedules described themselves
        return Described({"kind": "custom", "class": every})
    return parse(every)
