"""Live logging to TensorBoard while training runs (``attach(..., tensorboard=logdir)``).

At each recorded step it writes what the alert monitor measured of every layer
(``covshift/live/<quantity>/<layer>``: the W1 drift step to step, σ, max |x|, the
fraction of dead channels, the non-finite count) and each new alert as text
(``covshift/alerts``) with the running count (``covshift/live/alerts``). TensorBoard's
writer is imported only when asked for (the ``tensorboard`` extra).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from covshift.record.alerts import Alert


class LiveLog:
    """A TensorBoard event file in ``logdir`` that the tracker writes at each recorded step."""

    def __init__(self, logdir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(f"attach(..., tensorboard=...) needs tensorboard: pip install 'covshift[tensorboard]' "
                              f"({err})") from None
        self.writer: Any = SummaryWriter(str(logdir))
        self.alerts = 0

    def write(self, step: int, values: dict[str, dict[str, float]], alerts: list[Alert]) -> None:
        """Scalars of the step's layers and its new alerts."""
        for layer, quantities in values.items():
            for quantity, value in quantities.items():
                if math.isfinite(value):
                    self.writer.add_scalar(f"covshift/live/{quantity}/{layer}", value, step)
        for alert in alerts:
            self.writer.add_text("covshift/alerts", str(alert), step)
        self.alerts += len(alerts)
        self.writer.add_scalar("covshift/live/alerts", self.alerts, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
