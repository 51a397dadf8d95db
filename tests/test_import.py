"""``import dml_bias`` is light (no heavy optional imports, no warnings) and the package's imports are tidy.

How fast the import is belongs to ``benchmarks/import_time.py`` (a ratio against ``import torch``), not here.
The static checks below read the source: no module imports a private (``_name``) name of another module (a
shared piece gets a public name in a home module that both import), the modules import each other without
cycles, and ``assert`` is used for type narrowing only, never to check an argument (``python -O`` strips it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torchvision", "faiss", "matplotlib", "scipy", "tqdm", "sklearn", "PIL")


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return out.stdout.strip()


def test_import_has_version_and_no_warnings() -> None:
    version = _run("import dml_bias; print(dml_bias.__version__)")
    assert version
    assert version[0].isdigit()


def test_import_pulls_in_no_heavy_module() -> None:
    code = "import sys, dml_bias; print(','.join(m for m in " + repr(HEAVY) + " if m in sys.modules))"
    assert _run(code) == ""


def test_lazy_submodule_access() -> None:
    code = "import sys, dml_bias; s = dml_bias.similarity; print('dml_bias.similarity' in sys.modules, s.__name__)"
    assert _run(code) == "True dml_bias.similarity"


def test_unknown_attribute_raises() -> None:
    code = (
        "import dml_bias\n"
        "try:\n    dml_bias.not_a_module\nexcept AttributeError as e:\n    print('AttributeError', e)\n"
    )
    assert _run(code).startswith("AttributeError module 'dml_bias' has no attribute 'not_a_module'")


PACKAGE = Path(__file__).parents[1] / "dml_bias"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def type_checking_only(tree: ast.AST) -> set[ast.AST]:
    """The statements under ``if TYPE_CHECKING:``: they never run, so they import nothing."""
    skipped: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for statement in node.body:
                skipped.update(ast.walk(statement))
    return skipped


def imports_of(tree: ast.AST, type_only: bool = False) -> list[tuple[int, str, str | None]]:
    """``(line, module, name)`` for every ``from dml_bias... import name`` and ``import dml_bias...`` (any depth).

    ``type_only``: also the imports under ``if TYPE_CHECKING:`` (they never run, but they are dependencies too).
    """
    found: list[tuple[int, str, str | None]] = []
    skipped = set() if type_only else type_checking_only(tree)
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("dml_bias"):
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.startswith("dml_bias")]
    return found


def package_exports(package: str) -> dict[str, str]:
    """Where the names a package's ``__init__`` imports come from (``{name: defining module}``)."""
    tree = ast.parse(MODULES[package].read_text())
    return {name: module for _, module, name in imports_of(tree) if name is not None and module in MODULES}


def target_module(module: str, name: str | None) -> str:
    """The module an import really loads the name from (a package's re-export resolved to its source)."""
    if name is not None and f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    if name is not None and module in PACKAGES:
        return package_exports(module).get(name, module)
    return module


def test_no_module_imports_a_private_name_of_another() -> None:
    offenders = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}
        for line, source, name in imports_of(tree):
            if name is None:
                continue
            if f"{source}.{name}" in MODULES:
                aliases[name] = f"{source}.{name}"  # a module: its attributes are checked below
            elif name.startswith("_"):
                offenders.append(f"{module}:{line} imports {name} from {source}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                offenders.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert offenders == []


@pytest.mark.parametrize("type_only", [False, True], ids=["runtime", "with-type-only"])
def test_modules_import_each_other_without_cycles(type_only: bool) -> None:
    # Function-level imports count too: they are how a cycle hides (knn <-> the faiss fallback did); with
    # type_only, so do the imports under TYPE_CHECKING (a type-only cycle is a layering cycle all the same).
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        if module in PACKAGES:
            continue  # a package's __init__ only re-exports; its submodules carry the dependencies
        tree = ast.parse(path.read_text())
        targets = {target_module(src, name) for _, src, name in imports_of(tree, type_only)}
        graph[module] = {t for t in targets if t in MODULES and t not in PACKAGES and t != module}

    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def narrowing_only(node: ast.Assert) -> bool:
    """``assert x is not None`` (or an ``and`` of those): a note to the type checker, not a check of an input."""
    tests = node.test.values if isinstance(node.test, ast.BoolOp) and isinstance(node.test.op, ast.And) else [node.test]
    return all(
        isinstance(t, ast.Compare)
        and len(t.ops) == 1
        and isinstance(t.ops[0], ast.IsNot)
        and isinstance(t.comparators[0], ast.Constant)
        and t.comparators[0].value is None
        for t in tests
    )


@pytest.mark.parametrize(
    ("source", "allowed"),
    [("assert x is not None", True), ("assert a.b is not None and c is not None", True), ("assert k > 0", False)],
)
def test_narrowing_only_recognises_type_notes(source: str, allowed: bool) -> None:
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.Assert)
    assert narrowing_only(node) is allowed


def test_asserts_in_the_library_only_narrow_types() -> None:
    # dml_bias/bias is checked by its own tests (the study's configuration is validated there).
    offenders = [
        f"{module}:{node.lineno}: {ast.unparse(node)}"
        for module, path in MODULES.items()
        if not module.startswith("dml_bias.bias")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert) and not narrowing_only(node)
    ]
    assert offenders == []
