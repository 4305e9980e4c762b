"""The package's shape: the pipeline's layers (import-linter's contract in pyproject.toml, run by
`make lint`) say which way imports go between folders; these say what a layer contract cannot:
no import cycle anywhere, lazy and TYPE_CHECKING imports included, and no module reaching into
another's `_private` names. Both were real causes of defects (docs/design.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "corral"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[tuple[str, str | None]]]:
    """For each module: (imported module, imported name or None), every import statement."""
    out: dict[str, set[tuple[str, str | None]]] = {}
    for name, path in mods.items():
        found: set[tuple[str, str | None]] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}:{node.lineno}: relative import"
                if node.module and node.module.split(".")[0] == "corral":
                    for alias in node.names:
                        sub = f"{node.module}.{alias.name}"
                        found.add((sub, None) if sub in mods else (node.module, alias.name))
            elif isinstance(node, ast.Import):
                found.update((a.name, None) for a in node.names if a.name in mods)
        out[name] = found
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    mods = modules()
    graph = {name: {target for target, _ in found if target != name and target in mods}
             for name, found in imports(mods).items()}
    assert cycles(graph) == []


def test_no_module_imports_another_modules_private_names():
    private = [(name, target, attr) for name, found in imports(modules()).items()
               for target, attr in found if attr is not None and attr.startswith("_")]
    assert private == []


def test_subpackages_are_empty_so_the_launch_path_loads_only_what_it_uses():
    for init in PACKAGE.rglob("__init__.py"):
        if init.parent != PACKAGE:
            assert init.read_text().strip() == "", init


def test_docs_design_names_every_module_in_its_folders_row():
    """docs/design.md's table says where each thing lives: a module it does not name is one a
    reader cannot find (journal/'s modules are in recover's row)."""
    import re

    design = (PACKAGE.parent.parent / "docs" / "design.md").read_text()
    rows = {}
    for line in design.splitlines():
        if line.startswith("| `"):
            cells = line.split(" | ")
            for folder in re.findall(r"`([a-z_]+)`", cells[0]):
                rows[folder] = set(re.findall(r"`([a-z_]+)[`/(]", cells[-1]))
    missing = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) < 2 or path.name == "__init__.py":
            continue
        named = rows.get(parts[0], set())
        if path.stem not in named:
            missing.setdefault(parts[0], []).append("/".join(parts))
    assert missing == {}
