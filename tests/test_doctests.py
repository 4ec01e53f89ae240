"""The examples in covshift's docstrings run and print what they show: one test per module.

This replaces ``pytest --doctest-modules`` over ``covshift/`` (pytest collects
``tests/`` only). Like pytest's doctest collection it leaves out ``__main__.py``,
uses pytest's default option flag (``ELLIPSIS``; pyproject.toml sets no
``doctest_optionflags``) and skips the adapters whose framework is not installed.
Each module's examples run in a temporary working directory, since some write files.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "covshift"

#: pytest's default ``doctest_optionflags``, so the examples behave as they did under --doctest-modules.
OPTIONFLAGS = doctest.ELLIPSIS

#: Adapter module -> (the framework it needs, covshift's extra that installs it).
FRAMEWORKS = {
    "covshift.integrations.lightning": ("lightning", "lightning"),
    "covshift.integrations.huggingface": ("transformers", "huggingface"),
    "covshift.integrations.tensorboard": ("tensorboard", "tensorboard"),
}


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts or path.name == "__main__.py":
            continue
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def test_every_adapter_with_a_framework_is_a_module():
    """The skip table names real modules (a renamed adapter would otherwise skip nothing and test nothing)."""
    assert set(FRAMEWORKS) <= set(module_names())


@pytest.mark.parametrize("name", module_names())
def test_doctests(name, monkeypatch, tmp_path):
    if name in FRAMEWORKS:
        framework, extra = FRAMEWORKS[name]
        if importlib.util.find_spec(framework) is None:
            pytest.skip(f"{name} needs {framework}: pip install 'covshift[{extra}]'")
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    tests = [test for test in doctest.DocTestFinder().find(module, name) if test.examples]
    source = Path(module.__file__).read_text(encoding="utf-8")
    if any(line.lstrip().startswith(">>> ") for line in source.splitlines()):
        assert tests, f"{name} has '>>>' examples but doctest found none of them (not in a docstring of the module?)"
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    for test in sorted(tests, key=lambda t: (t.lineno or 0, t.name)):
        runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    failed = f"{results.failed} of {results.attempted} examples failed in {name}:\n"
    assert results.failed == 0, failed + "".join(report)
