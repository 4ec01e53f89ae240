"""The docs run as written and print what they show.

Every ```python block of the pages below runs, in order, in an empty directory;
blocks of one page share one namespace, as a reader's session does. A ```text
block right after a python block (prose between is fine, no other fence) is what
that block prints, and is compared with what it printed. A ```console block holds
``$ covshift ...`` commands, each followed by its output, and each is run and
compared the same way. Only what legitimately varies between runs is normalized
(:data:`VARYING`): the time a run was created and its size on disk.

A block that genuinely cannot run here (it needs a dataset, a GPU or several
processes) is marked on the line just above its fence with
``<!-- doc-test: skip: REASON -->``; the reason is required. The README's blocks
run twice: copying the quickstart again must work too.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pytest

from covshift.cli import main

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
#: Page -> how many times its blocks run.
PAGES = {"README.md": 2, "docs/guide.md": 1, "docs/metrics.md": 1, "docs/science.md": 1}
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_SKIP = re.compile(r"<!-- doc-test: skip(?::\s*(.*?))? -->\s*$")
#: What varies from one run to the next in shown output, and what it is shown as.
VARYING = (
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"), "<time>"),
    (re.compile(r"size on disk: [\d.]+ [KMG]?i?B in \d+ files"), "size on disk: <size>"),
)


@dataclass
class Block:
    line: int
    language: str
    code: str
    skip: str | None
    end: int = 0  # the offset just past its closing fence
    start: int = 0  # the offset of its opening fence
    shown: str | None = None  # python: the text block that follows it


def blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown page; each python block with the output shown after it."""
    found = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = _SKIP.search(before)
        reason = None
        if skip:
            reason = (skip.group(1) or "").strip()
            if not reason:
                raise ValueError(f"line {line}: a doc-test skip needs a reason: <!-- doc-test: skip: WHY -->")
        found.append(Block(line, match.group(1), match.group(2), reason, match.end(), match.start()))
    for block, after in zip(found, found[1:]):
        if block.language == "python" and after.language == "text" and not _heading_between(text, block, after):
            block.shown = after.code
    return found


def _heading_between(text: str, block: Block, after: Block) -> bool:
    """Whether a section heading stands between two blocks (then the second is not the first one's output)."""
    return any(line.startswith("#") for line in text[block.end:after.start].splitlines())


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) of each ```python block of a Markdown page."""
    return [(b.line, b.code, b.skip) for b in blocks(text) if b.language == "python"]


def normalized(output: str) -> str:
    for pattern, shown_as in VARYING:
        output = pattern.sub(shown_as, output)
    return "\n".join(line.rstrip() for line in output.strip("\n").splitlines())


def console_commands(code: str) -> list[tuple[str, str]]:
    """``(command, output)`` of each ``$ ...`` line of a console block and the lines up to the next one."""
    commands: list[tuple[str, list[str]]] = []
    for line in code.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif commands:
            commands[-1][1].append(line)
    return [(command, "\n".join(output)) for command, output in commands]


def test_blocks_find_code_outputs_and_skip_reasons():
    text = ("a\n```python\nx = 1\n```\nprints:\n```text\n1\n```\n<!-- doc-test: skip: needs MNIST -->\n"
            "```python\ny = 2\n```\n```bash\nls\n```\n")
    assert python_blocks(text) == [(2, "x = 1\n", None), (10, "y = 2\n", "needs MNIST")]
    assert [b.shown for b in blocks(text) if b.language == "python"] == ["1\n", None]
    with pytest.raises(ValueError, match="needs a reason"):
        python_blocks("<!-- doc-test: skip -->\n```python\nz = 3\n```\n")
    assert console_commands("$ covshift stats r\nrun 'r'\n\n$ covshift --version\ncovshift 0\n") == [
        ("covshift stats r", "run 'r'\n"), ("covshift --version", "covshift 0")]
    assert normalized("created 2026-11-24T19:14:26+00:00  \nsize on disk: 1.7 MiB in 3 files\n\n") == (
        "created <time>\nsize on disk: <size>")


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_code_runs_as_written_and_prints_what_it_shows(page, tmp_path, monkeypatch):
    found = blocks((ROOT / page).read_text())
    assert any(b.language == "python" for b in found), f"{page} has no python blocks"
    monkeypatch.chdir(tmp_path)
    for _ in range(PAGES[page]):
        namespace: dict = {"__name__": "__doc_test__"}
        for block in found:
            if block.skip is not None:
                continue
            if block.language == "python":
                printed = io.StringIO()
                try:
                    with contextlib.redirect_stdout(printed):
                        exec(compile(block.code, f"{page}:{block.line}", "exec"), namespace)  # noqa: S102
                except Exception as err:
                    raise AssertionError(f"the block at {page}:{block.line} fails: {type(err).__name__}: {err}") from err
                if block.shown is not None:
                    assert normalized(printed.getvalue()) == normalized(block.shown), (
                        f"the block at {page}:{block.line} prints something else than the page shows")
            elif block.language == "console":
                for command, shown in console_commands(block.code):
                    printed = io.StringIO()
                    with contextlib.redirect_stdout(printed):
                        status = main(shlex.split(command)[1:])
                    assert status == 0, f"{page}:{block.line}: `{command}` exited {status}"
                    assert normalized(printed.getvalue()) == normalized(shown), (
                        f"{page}:{block.line}: `{command}` prints something else than the page shows")


def test_every_skipped_block_is_justified():
    for page in PAGES:
        for line, _, skip in python_blocks((ROOT / page).read_text()):
            assert skip is None or len(skip) > 10, f"{page}:{line}: say why the block cannot run"


def test_every_shown_output_is_checked():
    """An output block must follow the block that prints it; a bare ``` block after python code would go unchecked."""
    for page in PAGES:
        text = (ROOT / page).read_text()
        found = blocks(text)
        for block, after in zip(found, found[1:]):
            if block.language == "python" and block.skip is None and not _heading_between(text, block, after):
                assert after.language != "", f"{page}:{after.line}: mark output as ```text (or say what it is)"
