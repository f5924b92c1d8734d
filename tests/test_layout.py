"""The package's import structure: layers import only downwards, no command imports another
command, no cycles, and imports inside functions only for heavy or optional dependencies (each
with its reason beside it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "lm"
# Loaded on first use, not at import: heavy, or needed by one path of one command.
LAZY_ALLOWED = ("datasets", "hydra", "matplotlib", "torch.utils.cpp_extension", "torch.utils.tensorboard", "tqdm")
# The layers, lowest first: a module may import its own layer and the layers before it. The
# commands (``python -m lm.X``: the modules at the top of lm/ but the schema) sit above them all.
LAYERS = ("lm.config", "lm.infra", "lm.data", "lm.kernels", "lm.model", "lm.engine", "lm.reporting")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
COMMANDS = sorted(
    name for name in MODULES if (name.count(".") == 1 and name not in ("lm", *LAYERS)) or name.endswith(".__main__")
)


def _imports(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(lm modules imported anywhere in the file, (line, module) of every import inside a function)."""
    tree = ast.parse(path.read_text())
    lm_modules, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif node.module and node.module.startswith("lm") and node.level == 0:
                # from lm import kernels / from lm.engine import step: the module itself when it is one
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names]
            else:
                names = [node.module or ""]
            lm_modules.update(n for n in names if n == "lm" or n.startswith("lm."))
            if node.col_offset > 0:
                nested.extend((node.lineno, n) for n in names)
    return lm_modules, nested


GRAPH = {name: _imports(path)[0] for name, path in MODULES.items()}


def layer_of(module: str) -> int:
    """The index of ``module``'s layer in LAYERS; the commands come after every layer."""
    for index, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            return index
    return len(LAYERS)


def test_the_layout_is_what_the_test_assumes():
    """Every module is in a layer or is a command; the commands are the ones users run."""
    assert set(COMMANDS) == {
        "lm.ablation",
        "lm.data.__main__",
        "lm.ensemble",
        "lm.evaluate",
        "lm.figures",
        "lm.generate",
        "lm.report",
        "lm.reproduce",
        "lm.train",
    }
    strays = [m for m in MODULES if m not in COMMANDS and m != "lm" and layer_of(m) == len(LAYERS)]
    assert not strays, f"modules in no layer: {strays}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_downwards_only(module):
    """A library module imports from its own layer or the ones below it, never a command."""
    if module in COMMANDS:
        wrong = [dep for dep in GRAPH[module] if dep in COMMANDS]
        assert not wrong, f"command {module} imports command(s) {wrong}: move what they share into the library"
        return
    mine = layer_of(module)
    wrong = [dep for dep in GRAPH[module] if dep in COMMANDS or layer_of(dep) > mine]
    assert not wrong, f"{module} ({LAYERS[mine]}) imports {wrong}, from a layer above it"


def test_the_check_catches_an_upward_import():
    """The rule above is not vacuous: the graph has edges, and an upward one would be reported."""
    assert sum(len(deps) for deps in GRAPH.values()) > 50
    assert layer_of("lm.engine.training") > layer_of("lm.model.language_model") > layer_of("lm.config")
    assert layer_of("lm.train") == len(LAYERS)


@pytest.mark.parametrize("command", COMMANDS)
def test_commands_are_thin(command):
    """A command is argument handling and a call (about 100 lines at most)."""
    lines = len(MODULES[command].read_text().splitlines())
    assert lines <= 110, f"{command} has {lines} lines: move the work into the library"


def test_no_import_cycle_in_lm():
    """Counting imports inside functions too: a cycle dodged by a late import is still a cycle."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, "import cycle: " + " -> ".join(path[path.index(module) :] + [module])
        if module in done:
            return
        for dep in GRAPH.get(module, ()):
            visit(dep, path + [module])
        done.add(module)

    for module in GRAPH:
        visit(module, [])


def test_imports_inside_functions_are_only_heavy_or_optional_dependencies():
    for name, path in MODULES.items():
        for line, module in _imports(path)[1]:
            assert module.startswith(LAZY_ALLOWED), f"{name}:{line} imports {module} inside a function"
