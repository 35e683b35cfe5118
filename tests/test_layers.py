"""The package's layering: the library (ops, mixers, cache policies, registry) never imports the lab or
the CLI, and the lab has no import cycle. Read from the source with ast, so a lazy import inside a function
counts too."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

import gatelab

ROOT = Path(gatelab.__file__).parent
LIBRARY = ("ops", "mixers", "cache", "gates", "routers", "hf", "registry.py", "testing.py", "benchmarking.py")
UPPER = ("gatelab.lab", "gatelab.commands", "gatelab.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every gatelab module ``path`` imports, absolute or relative, at any depth of the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import submodule`
    return {m for m in found if m == "gatelab" or m.startswith("gatelab.")}


def library_files():
    for entry in LIBRARY:
        path = ROOT / entry
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("path", list(library_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_never_imports_the_lab_or_the_cli(path):
    bad = sorted(m for m in imports_of(path) if m.startswith(UPPER))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: the library must not depend on the lab or CLI"


def _transformers_imports(tree: ast.AST):
    """(node, at module level) for every import of transformers in a parsed file."""
    top = set()
    for node in tree.body:  # module level, including under a top-level if/try
        top |= (
            {id(n) for n in ast.walk(node)} if not isinstance(node, ast.FunctionDef | ast.ClassDef) else set()
        )
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        if any(n == "transformers" or n.startswith("transformers.") for n in names):
            yield node, id(node) in top


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_transformers_is_imported_only_lazily_inside_gatelab_hf(path):
    """transformers is an optional extra: only gatelab.hf may import it, and only inside functions, so that
    ``import gatelab`` and ``import gatelab.hf`` work without it."""
    inside_hf = path.relative_to(ROOT).parts[0] == "hf"
    for node, at_top in _transformers_imports(ast.parse(path.read_text())):
        where = f"{path.relative_to(ROOT)}:{node.lineno}"
        assert inside_hf, f"{where} imports transformers; only gatelab/hf may"
        assert not at_top, f"{where} imports transformers at module level; import it inside the function"


def test_no_import_cycle_between_modules():
    """A cycle between module files (lazy imports included) is how report.py and compare_kv.py were
    tied; with none, every module can be read and tested from the bottom up."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {
        name: {m for m in imports_of(p) if m in files and m != name and not name.startswith(m + ".")}
        for name, p in files.items()
    }
    # a package's __init__ importing its own sub-modules is how packages export; not a cycle of files
    graph = {n: {m for m in deps if not m.startswith(n + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize(
    "old, new",
    [
        ("gatelab.train", "gatelab.lab.train"),
        ("gatelab.models.lm", "gatelab.lab.models.lm"),
        ("gatelab.tasks", "gatelab.lab.tasks"),
        ("gatelab.cache.evaluate", "gatelab.lab.kv.evaluate"),
        ("gatelab.compare_kv", "gatelab.lab.kv.rows"),
    ],
)
def test_old_import_paths_warn_and_give_the_same_module(old, new):
    import sys

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


def test_op_packages_stay_modules_and_call_as_their_op():
    import inspect

    import gatelab.ops.gla as gla_package

    assert inspect.ismodule(gla_package) and gla_package is gatelab.ops.gla
    assert gla_package.reference.gla_reference is not None  # the package's modules are reachable
    assert "initial_state" in inspect.signature(gatelab.ops.gla).parameters
