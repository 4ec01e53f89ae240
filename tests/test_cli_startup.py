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


def test_submodules_do_not_shadow_the_public_functions():
    import covshift.drift  # noqa: F401  the submodules of the same names as the functions
    import covshift.report  # noqa: F401

    assert callable(covshift.drift) and callable(covshift.report)
    assert covshift.drift.__module__ == "covshift.drift"


def test_help_defaults_match_the_library():
    from covshift.figures import DEFAULT_MAX_POINTS
    from covshift.panels import MAX_HEIGHT_PX
    from covshift.report import DEFAULT_METRICS, DEFAULT_TOP, PROGRESS_LAYERS

    assert cli.DEFAULT_MAX_POINTS == DEFAULT_MAX_POINTS
    assert tuple(cli.DEFAULT_METRICS) == tuple(DEFAULT_METRICS)
    assert (cli.DEFAULT_TOP, cli.PROGRESS_LAYERS) == (DEFAULT_TOP, PROGRESS_LAYERS)
    assert f"taller than {MAX_HEIGHT_PX:,} pixels" in cli._REPORT_EPILOG
