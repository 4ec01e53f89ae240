"""covshift: see internal covariate shift, the drift of each hidden layer's input while a network trains."""

from covshift.drift import drift, drift_table, drift_to_noise, noise_floor
from covshift.report import report
from covshift.run import Run, load
from covshift.tracker import Tracker, attach

__version__ = "0.1.0"

__all__ = [
    "Run",
    "Tracker",
    "attach",
    "drift",
    "drift_table",
    "drift_to_noise",
    "load",
    "noise_floor",
    "report",
]
