"""Every ```python block of README.md, docs/guide.md, docs/metrics.md and docs/science.md runs as written, in order, in an empty directory.

A block that genuinely cannot run here (it needs a dataset or a GPU) is marked on
the line just above its fence with ``<!-- doc-test: skip: REASON -->``; the
reason is required. Blocks of one page share one namespace, as a reader's
session does. The README's blocks run twice: copying the quickstart again
must work too.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"README.md": 2, "docs/guide.md": 1, "docs/metrics.md": 1, "docs/science.md": 1}  # page: how many times its blocks run
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_SKIP = re.compile(r"<!-- doc-test: skip(?::\s*(.*?))? -->\s*$")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) of each ```python block of a Markdown page."""
    blocks = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = _SKIP.search(before)
        reason = None
        if skip:
            reason = (skip.group(1) or "").strip()
            if not reason:
                raise ValueError(f"line {line}: a doc-test skip needs a reason: <!-- doc-test: skip: WHY -->")
        blocks.append((line, match.group(1), reason))
    return blocks


def test_python_blocks_finds_code_and_skip_reasons():
    text = "a\n```python\nx = 1\n```\n<!-- doc-test: skip: needs MNIST -->\n```python\ny = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n", None), (6, "y = 2\n", "needs MNIST")]
    with pytest.raises(ValueError, match="needs a reason"):
        python_blocks("<!-- doc-test: skip -->\n```python\nz = 3\n```\n")


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_code_runs_as_written(page, tmp_path, monkeypatch):
    blocks = python_blocks((ROOT / page).read_text())
    assert blocks, f"{page} has no python blocks"
    monkeypatch.chdir(tmp_path)
    for _ in range(PAGES[page]):
        namespace: dict = {"__name__": "__doc_test__"}
        for line, code, skip in blocks:
            if skip is not None:
                continue
            try:
                exec(compile(code, f"{page}:{line}", "exec"), namespace)  # noqa: S102
            except Exception as err:
                raise AssertionError(f"the block at {page}:{line} fails: {type(err).__name__}: {err}") from err


def test_every_skipped_block_is_justified():
    for page in PAGES:
        for line, _, skip in python_blocks((ROOT / page).read_text()):
            assert skip is None or len(skip) > 10, f"{page}:{line}: say why the block cannot run"
