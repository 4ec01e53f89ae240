"""The documented import path of gradient ICS; it lives in :mod:`covshift.science.gradient_ics`
and its plot in :mod:`covshift.reporting.plots`."""

from covshift.reporting.plots import plot_gradient_ics
from covshift.science.gradient_ics import COLUMNS, GRADIENTS_FILE, GradientICS, load_gradient_ics

__all__ = ["COLUMNS", "GRADIENTS_FILE", "GradientICS", "load_gradient_ics", "plot_gradient_ics"]
