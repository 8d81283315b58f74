"""The package's imports point down: each module imports only modules of its own layer's unit
or of layers below it (``LAYERS``), and no modules import each other in a circle. Read from the
source (every import statement, function-level ones included; not the type-only ones under
``if TYPE_CHECKING:``, which never run), not from what Python loaded."""

from __future__ import annotations

import ast
from pathlib import Path

import sharded_shampoo

ROOT = Path(sharded_shampoo.__file__).parent
PACKAGE = "sharded_shampoo"

# Lowest first: a unit (a top-level module or subpackage) may import its own modules and the
# units of lower layers. The package's __init__ re-exports, on top.
LAYERS = (
    ("options", "status", "blocking", "agreement", "param_groups"),
    ("diagnostics", "algorithm", "placement"),
    ("topology",),
    ("params", "state"),
    ("memory", "distributors", "refreshes", "checkpoint"),
    ("work",),
    ("optimizer",),
    ("integrations", ""),  # "": the package's __init__
)


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((PACKAGE, *parts))] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports: ``from x import y`` counts as
    ``x.y`` where that is a module, else ``x``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _statements(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            targets = [
                f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in known else base_name
                for a in node.names
            ]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def _statements(tree: ast.AST):
    """Every node of ``tree`` but what lies under ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (n for s in child.orelse for n in [s, *_statements(s)])
            continue
        yield child
        yield from _statements(child)


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def layer_of(u: str) -> int:
    for i, units in enumerate(LAYERS):
        if u in units:
            return i
    raise AssertionError(f"{PACKAGE}.{u} is in no layer of LAYERS: declare it")


def test_every_import_points_down_the_layers():
    upward = [
        f"{name} imports {dep}"
        for name, deps in graph().items()
        for dep in sorted(deps)
        if unit(dep) != unit(name) and layer_of(unit(dep)) >= layer_of(unit(name))
    ]
    assert not upward, "imports at or above their own layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    cycles, state = [], {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep) :] + [node, dep][1:]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_what_they_check():
    """The parser finds known imports, and the layers cover every unit (a check over an empty
    graph would pass)."""
    g = graph()
    assert "sharded_shampoo.options" in g["sharded_shampoo.algorithm.refresh"]
    assert "sharded_shampoo.work" in g["sharded_shampoo.optimizer"]
    for name in g:
        layer_of(unit(name))
