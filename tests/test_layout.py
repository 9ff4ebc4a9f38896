"""The package's layout as rules a test can hold: the module import graph (every import,
also those inside functions) has no circle, ``core/`` imports nothing of diffsens above
it, and only ``sweeps.py`` touches Hydra's private modules."""

from __future__ import annotations

import ast
from pathlib import Path

import diffsens_cli

PACKAGE = Path(diffsens_cli.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every module an import in ``path`` names (absolute names); ``from pkg import mod`` names
    ``pkg.mod`` only when that is a module of the package."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            out |= subs or {node.module}
    return out


def _graph() -> dict[str, set[str]]:
    return {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def test_the_import_graph_has_no_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert len(graph) > 40  # the graph was read: every module of the package


def test_core_imports_nothing_above_it():
    """What ``core/`` needs, directly or not, is ``core/`` and leaf helpers that need no other
    module of the package (errors, progress bars, interrupts), never a pipeline, builder,
    data set or model."""
    graph = _graph()
    leaves = {m for m, deps in graph.items() if not deps - {"diffsens_cli"}}
    needed, todo = set(), [m for m in graph if m.startswith("diffsens_cli.core")]
    while todo:
        for dep in graph[todo.pop()] - needed:
            needed.add(dep)
            todo.append(dep)
    above = sorted(m for m in needed if not m.startswith("diffsens_cli.core") and m not in leaves | {"diffsens_cli"})
    assert above == []
    assert {"diffsens_cli.progress", "diffsens_cli.interrupt"} <= needed  # the closure was followed


def test_only_the_sweeps_module_uses_hydras_internals():
    users = sorted(_module_name(p) for p in PACKAGE.rglob("*.py")
                   if any(m.startswith("hydra._internal") for m in _imports(p)))
    assert users == ["diffsens_cli.sweeps"]


def test_the_readme_lists_every_experiment_in_both_tables():
    readme = (PACKAGE.parent / "README.md").read_text()
    experiments = sorted(p.stem for p in (PACKAGE.parent / "configs" / "experiment").glob("*.yaml"))
    group_row = next(line for line in readme.splitlines() if line.startswith("| `experiment` |"))
    assert [e for e in experiments if f"`{e}`" not in group_row] == []
    assert [e for e in experiments if f"experiment={e}" not in readme and e != "train"] == []


def test_every_subpackage_ships_in_a_wheel():
    """pyproject lists its packages by hand: a new subpackage left out of it works in the
    editable install of the tests and is missing from a user's wheel."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(p) for p in PACKAGE.rglob("__init__.py")} - {"diffsens_cli.configs"}
    assert found - listed == set()


def test_every_module_directly_in_pipelines_is_a_task():
    from diffsens_cli.pipelines import TASK_NAMES

    modules = {p.stem for p in (PACKAGE / "pipelines").glob("*.py")} - {"__init__"}
    assert modules == set(TASK_NAMES)
