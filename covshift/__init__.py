"""covshift: see internal covariate shift, the drift of each hidden layer's input while a network trains."""

from covshift.run import Run, load
from covshift.tracker import Tracker, attach
from covshift.drift import drift, drift_table, drift_to_noise, noise_floor  # drift metrics engineer
from covshift.report import report  # noqa: E402  (report + CLI engineer)

__version__ = "0.1.0"

__all__ = ["Run", "Tracker", "attach", "load", "__version__"]
