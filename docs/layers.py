"""Draw corral's layers from the code's own imports: `python docs/layers.py` writes
docs/layers.dot (one box per folder, the module count in it, an arrow per folder-to-folder import
labelled with how many modules of the lower folder the upper one imports) and, where Graphviz's `dot` is installed, docs/layers.svg.
`make layers` runs it. The picture is made from the code, so it cannot drift from it."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

DOCS = Path(__file__).resolve().parent
PACKAGE = DOCS.parent / "src" / "corral"
# Top to bottom, as in pyproject.toml's layer contract.
ORDER = ["cli", "audit", "learn", "export", "supervise", "watch", "hostimage", "recover", "launch",
         "host", "plan", "manifest", "kernel", "core"]


def folder_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "corral" else None


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def edges() -> tuple[Counter[tuple[str, str]], Counter[str]]:
    arrows: Counter[tuple[str, str]] = Counter()
    sizes: Counter[str] = Counter()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" or path.parent == PACKAGE:
            continue
        here = path.relative_to(PACKAGE).parts[0]
        sizes[here] += 1
        seen = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                module = name if is_module(name) else name.rsplit(".", 1)[0]
                there = folder_of(module)
                if there and there != here and module not in seen:
                    seen.add(module)
                    arrows[(here, there)] += 1
    return arrows, sizes


def dot() -> str:
    arrows, sizes = edges()
    lines = ["digraph corral {", '  rankdir=TB; node [shape=box, fontname="sans-serif"];',
             '  edge [color="#555555", fontname="sans-serif", fontsize=9];']
    for name in ORDER:
        lines.append(f'  "{name}" [label="{name}\\n{sizes[name]} modules"];')
    for (src, dst), count in sorted(arrows.items()):
        lines.append(f'  "{src}" -> "{dst}" [label="{count}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> int:
    text = dot()
    (DOCS / "layers.dot").write_text(text)
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tsvg", "-o", str(DOCS / "layers.svg"), str(DOCS / "layers.dot")],
                       check=True)
    else:
        print("layers.py: Graphviz's dot is not installed; wrote layers.dot only", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
