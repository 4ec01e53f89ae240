"""covshift: see internal covariate shift, the drift of each hidden layer's input while a network trains.

The public names load on first use, so ``import covshift`` and ``covshift --help``
stay fast: torch, pandas and matplotlib are imported only when a function needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "Alert": "covshift.record.alerts",
    "Run": "covshift.store.run",
    "Tracker": "covshift.record.tracker",
    "attach": "covshift.record.attach",
    "drift": "covshift.metrics.api",
    "drift_table": "covshift.metrics.api",
    "drift_to_noise": "covshift.metrics.api",
    "load": "covshift.store.run",
    "noise_floor": "covshift.metrics.api",
    "plot": "covshift.plotting",
    "report": "covshift.reporting.build",
    "to_tensorboard": "covshift.integrations.tensorboard",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from covshift.record.alerts import Alert
    from covshift.metrics.api import drift, drift_table, drift_to_noise, noise_floor
    from covshift.plotting import plot
    from covshift.reporting.build import report
    from covshift.store.run import Run, load
    from covshift.record.attach import attach
    from covshift.record.tracker import Tracker


#: Subpackages reachable as ``covshift.<name>`` after ``import covshift`` (loaded on first use too).
_SUBPACKAGES = ("metrics",)


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"covshift.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'covshift' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBPACKAGES})
