"""The documented import path of the verdict; it lives in :mod:`covshift.metrics.verdict`."""

from covshift.metrics.verdict import Verdict, compare, compare_runs

__all__ = ["Verdict", "compare", "compare_runs"]
