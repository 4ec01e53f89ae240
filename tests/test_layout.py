"""The package's layout (docs/architecture.md): layers, one import direction, no cycles, short modules.

Every module under ``covshift/`` is parsed with :mod:`ast` (nothing is imported)
and its module-level imports of covshift modules are collected: statements at
the top level of the file, including those inside top-level ``if`` (``if
TYPE_CHECKING:``), ``try`` and ``with`` blocks, but not those inside functions
or classes (the lazy imports that keep ``import covshift`` light).
``from covshift.x import y`` counts as an import of ``covshift.x.y`` when that
is a module or package, else of ``covshift.x``; the parent packages an import
runs (``covshift``, ``covshift.x``) are not counted.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "covshift"

#: Each module's rank, lowest first: a module may import, at module level, only modules of
#: its own rank or lower. An entry ending in ``.*`` ranks a subpackage and every module in it;
#: the others rank one module. Keep in step with docs/architecture.md.
RANKS = {
    # shared small parts
    "covshift.checks": 0,
    "covshift.columns": 0,
    "covshift.schedule": 0,
    "covshift.faults": 0,
    "covshift.defaults": 0,
    "covshift.summary.*": 1,  # summarize, finalize, row_statistics
    "covshift.store.*": 2,  # checked, files, manifest, records, writer, run, display
    "covshift.metrics.*": 3,  # formulas, registry, builtin, arrays, engine, api, verdict, seeds
    "covshift.record.*": 4,  # context, channels, layers, duplicates, probe, tracker, steps, backward, alerts, live, distributed, resume
    "covshift.science.*": 5,  # null_floor, gradient_ics
    "covshift.reporting.*": 6,  # text, data, plots, panels, figures, heatmap, sections, html, build
    "covshift.plotting": 7,
    "covshift": 7,  # the package root: its __init__ loads the public names lazily
    "covshift.integrations.*": 8,
    "covshift.experiments.*": 9,
    "covshift.cli": 10,
    "covshift.__main__": 10,
    # top-level modules kept for documented import paths, re-exporting from the layers below
    "covshift.noise": 10,
    "covshift.gradients": 10,
    "covshift.verdict": 10,
    "covshift.distributed": 10,
}

MAX_LINES = 400
#: Modules allowed over MAX_LINES lines: ``{"covshift/path.py": "why it stays in one piece"}``.
LONG_MODULES: dict[str, str] = {
    "covshift/record/tracker.py": "the Tracker's hooks, step counting, probes and locking are one state machine "
                                  "under one lock; its settings, attach(), channel axes (channels.py), "
                                  "duplicate inputs (duplicates.py) and probe trial (probe.py) are already apart",
}

#: Libraries ``import covshift`` must not load (the public names load lazily).
HEAVY = ("torch", "pandas", "matplotlib", "lightning", "transformers", "tensorboard", "wandb", "duckdb")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_files() -> dict[str, Path]:
    """``{module name: file}`` of every module under covshift/."""
    return {
        module_name(path): path
        for path in sorted(PACKAGE.rglob("*.py"))
        if "__pycache__" not in path.parts
    }


MODULES = module_files()


def rank_of(module: str) -> int | None:
    """The module's rank: its own entry, else that of the innermost ranked subpackage holding it."""
    if module in RANKS:
        return RANKS[module]
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        rank = RANKS.get(".".join(parts[:end]) + ".*")
        if rank is not None:
            return rank
    return None


def top_level_statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements that run when the module is imported: those of top-level if/try/with blocks too."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from top_level_statements(node.body)
            yield from top_level_statements(node.orelse)
        elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            yield from top_level_statements(node.body)
            for handler in node.handlers:
                yield from top_level_statements(handler.body)
            yield from top_level_statements(node.orelse)
            yield from top_level_statements(node.finalbody)
        elif isinstance(node, ast.With):
            yield from top_level_statements(node.body)


def _is_package(module: str) -> bool:
    return MODULES.get(module, Path()).name == "__init__.py"


def imported_modules(module: str, path: Path) -> list[tuple[str, int]]:
    """``(covshift module, line)`` of each module-level import of a covshift module in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in top_level_statements(tree.body):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, up level - 1
                package = module.split(".") if _is_package(module) else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
    return [(name, line) for name, line in found if name == "covshift" or name.startswith("covshift.")]


IMPORTS = {module: imported_modules(module, path) for module, path in MODULES.items()}


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_every_module_has_a_rank():
    unranked = [f"{name} ({relative(path)})" for name, path in MODULES.items() if rank_of(name) is None]
    assert not unranked, (
        "modules without a rank in the layer table; add each to docs/architecture.md and to RANKS "
        f"in tests/test_layout.py: {unranked}"
    )


def test_module_level_imports_name_existing_modules():
    """A stale import of a moved module (``covshift.drift``) fails here even inside ``if TYPE_CHECKING:``."""
    missing = [
        f"{relative(MODULES[module])}:{line} imports {imported}"
        for module, imports in IMPORTS.items()
        for imported, line in imports
        if imported not in MODULES
    ]
    assert not missing, "imports of covshift modules that do not exist:\n" + "\n".join(missing)


def test_no_module_imports_a_higher_rank():
    upward = []
    for module, imports in IMPORTS.items():
        own = rank_of(module)
        for imported, line in imports:
            theirs = rank_of(imported)
            if own is not None and theirs is not None and theirs > own:
                upward.append(f"{module} -> {imported} (rank {own} < rank {theirs}; "
                              f"{relative(MODULES[module])}:{line})")
    assert not upward, (
        "module-level imports of a higher layer (move the code down, or import inside the function "
        "that needs it):\n" + "\n".join(sorted(set(upward)))
    )


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, …, a]`` through each strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)

    cycles = []
    for group in groups:
        start = min(group)
        came_from: dict[str, str | None] = {start: None}  # breadth first: the shortest way back to start
        frontier, last = [start], None
        while last is None:
            following = []
            for node in frontier:
                if start in graph[node]:
                    last = node
                    break
                for nxt in sorted(graph[node] & group):
                    if nxt not in came_from:
                        came_from[nxt] = node
                        following.append(nxt)
            frontier = following
        path = [last]
        while came_from[path[-1]] is not None:
            path.append(came_from[path[-1]])
        cycles.append([*reversed(path), start])
    return cycles


def test_import_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert import_cycles(graph) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = {
        module: {imported for imported, _ in imports if imported in MODULES and imported != module}
        for module, imports in IMPORTS.items()
    }
    cycles = import_cycles(graph)
    assert not cycles, "module-level import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_modules_are_short():
    long = {
        relative(path): lines
        for path in MODULES.values()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    unexplained = {path: lines for path, lines in long.items() if path not in LONG_MODULES}
    assert not unexplained, (
        f"modules over {MAX_LINES} lines: split them, or list them with a reason in LONG_MODULES "
        f"(tests/test_layout.py): {unexplained}"
    )
    stale = sorted(set(LONG_MODULES) - set(long))
    assert not stale, f"LONG_MODULES lists modules that are gone or no longer over {MAX_LINES} lines: {stale}"


def test_no_conftest_inside_the_package():
    found = [relative(path) for path in PACKAGE.rglob("conftest.py")]
    assert not found, f"pytest configuration belongs in tests/, not in the package: {found}"


def test_import_covshift_loads_no_heavy_library():
    code = "import sys, covshift; print(sorted({n.split('.')[0] for n in sys.modules} & set(%r)))" % (HEAVY,)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"import covshift loaded {result.stdout.strip()}"
