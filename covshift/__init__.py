"""covshift: see internal covariate shift, the drift of each hidden layer's input while a network trains."""

from covshift.run import Run, load
from covshift.tracker import Tracker, attach

__version__ = "0.1.0"

__all__ = ["Run", "Tracker", "attach", "load", "__version__"]
