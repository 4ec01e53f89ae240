"""covshift: see internal covariate shift, the drift of each hidden layer's input while a network trains.

The public names load on first use, so ``import covshift`` and ``covshift --help``
stay fast: torch, pandas and matplotlib are imported only when a function needs them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "Run": "covshift.run",
    "Tracker": "covshift.tracker",
    "attach": "covshift.tracker",
    "drift": "covshift.drift",
    "drift_table": "covshift.drift",
    "drift_to_noise": "covshift.drift",
    "load": "covshift.run",
    "noise_floor": "covshift.drift",
    "plot": "covshift.plotting",
    "report": "covshift.report",
    "to_tensorboard": "covshift.integrations.tensorboard",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from covshift.drift import drift, drift_table, drift_to_noise, noise_floor
    from covshift.plotting import plot
    from covshift.integrations.tensorboard import to_tensorboard
    from covshift.report import report
    from covshift.run import Run, load
    from covshift.tracker import Tracker, attach


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'covshift' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Keeps ``covshift.drift`` and ``covshift.report`` the functions once their modules of the same name load.

    Importing a submodule binds it on its package (``covshift.drift = <module>``);
    for a public name that binding is skipped, and the module stays in ``sys.modules``.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
