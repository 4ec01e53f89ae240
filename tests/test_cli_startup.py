"""``covshift --help`` stays fast: it loads none of the heavy libraries (never a timed assertion)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import covshift
from covshift import cli

HEAVY = ("torch", "pandas", "pyarrow", "matplotlib", "numpy")

_PROBE = """
import runpy, sys
sys.argv = ["covshift", *{args!r}]
try:
    runpy.run_module("covshift", run_name="__main__")
except SystemExit:
    pass
print(sorted(name for name in {heavy!r} if name in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["report", "--help"], ["compare", "--help"]])
def test_help_imports_no_heavy_library(args):
    code = _PROBE.format(args=args, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "[]", result.stdout


def test_import_covshift_is_lazy_but_complete():
    code = "import sys, covshift; print(sorted(n for n in %r if n in sys.modules))" % (HEAVY,)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    assert set(covshift.__all__) <= set(dir(covshift))


def test_public_functions_come_from_their_rooms():
    assert callable(covshift.drift) and callable(covshift.report)
    assert covshift.drift.__module__ == "covshift.metrics.api"
    assert covshift.report.__module__ == "covshift.reporting.build"


def test_the_help_shows_the_library_defaults():
    import inspect

    from covshift import defaults
    from covshift.reporting.build import report

    params = inspect.signature(report).parameters
    assert tuple(params["metrics"].default) == defaults.DEFAULT_METRICS
    assert (params["top"].default, params["max_points"].default) == (defaults.DEFAULT_TOP, defaults.DEFAULT_MAX_POINTS)
    assert f"taller than {defaults.MAX_HEIGHT_PX:,} pixels" in cli._REPORT_EPILOG
