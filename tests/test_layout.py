"""The package's import structure: no cycles, and imports inside functions only for heavy or
optional dependencies (each with its reason beside it)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "lm"
# Loaded on first use, not at import: heavy, or needed by one path of one command.
LAZY_ALLOWED = ("datasets", "hydra", "matplotlib", "torch.utils.cpp_extension", "torch.utils.tensorboard", "tqdm")


def _imports(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(lm modules imported anywhere in the file, (line, module) of every import inside a function)."""
    tree = ast.parse(path.read_text())
    lm_modules, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif node.module == "lm":  # from lm import kernels
                names = [f"lm.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            lm_modules.update(n for n in names if n.startswith("lm."))
            if node.col_offset > 0:
                nested.extend((node.lineno, n) for n in names)
    return lm_modules, nested


def test_no_import_cycle_in_lm():
    """Counting imports inside functions too: a cycle dodged by a late import is still a cycle."""
    graph = {f"lm.{p.stem}": _imports(p)[0] for p in PACKAGE.glob("*.py")}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, "import cycle: " + " -> ".join(path[path.index(module) :] + [module])
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, path + [module])
        done.add(module)

    for module in graph:
        visit(module, [])


def test_imports_inside_functions_are_only_heavy_or_optional_dependencies():
    for path in PACKAGE.glob("*.py"):
        for line, module in _imports(path)[1]:
            assert module.startswith(LAZY_ALLOWED), f"{path.name}:{line} imports {module} inside a function"
