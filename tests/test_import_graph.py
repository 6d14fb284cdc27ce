"""No import cycles inside ``src/diffusekit``.

Every module is parsed with ``ast`` (nothing is imported). An edge ``a -> b`` is an import of the
package module ``b`` by ``a``: ``import diffusekit.x``, ``from . import x``, ``from .x import y``
(``y`` counts as the module ``x.y`` when that is a module, else as ``x``). Imports under
``if TYPE_CHECKING:`` never run and are skipped.

Two graphs are checked:

* module-level imports (run when the module is imported): no cycle at all;
* all imports, function-level (lazy) ones included: no cycle either, except that a lazy
  ``import diffusekit`` (the package root, used to look public names up by string) is not an edge,
  since the root itself imports nothing at module level. So a model never reaches the single-file
  loader, not even lazily; the loader knows the models.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "diffusekit"
ROOT = Path(__file__).resolve().parent.parent / "src" / PACKAGE


def _module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, lazy: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module: top level only, or (``lazy``) anywhere; never TYPE_CHECKING."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
        elif lazy or isinstance(node, (ast.If, ast.Try, ast.With)):
            todo.extend(ast.iter_child_nodes(node))
    return found


def _target(name: str) -> str | None:
    """The package module ``name`` refers to (its closest existing parent), or None outside the package."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _edges(module: str, lazy: bool) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in _imports(ast.parse(path.read_text(), str(path)), lazy):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            base = ".".join(filter(None, [base, node.module or ""]))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        for name in names:
            target = _target(name) if name.split(".")[0] == PACKAGE else None
            if target is not None and target != module and not (lazy and target == PACKAGE):
                targets.add(target)
    return targets


def import_graph(lazy: bool) -> dict[str, set[str]]:
    """Module -> the package modules it imports (``lazy``: function-level imports included)."""
    return {module: _edges(module, lazy) for module in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_graph_sees_known_imports():
    graph = import_graph(lazy=False)
    assert "diffusekit.models.modeling" in graph["diffusekit.models.unet_2d_condition"]
    assert "diffusekit.loaders.single_file_layout" in graph["diffusekit.loaders.single_file"]
    assert "diffusekit.schedulers.schedule_math" in graph["diffusekit.schedulers.sigma_base"]


def test_find_cycle_reports_the_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_level_import_cycle():
    cycle = find_cycle(import_graph(lazy=False))
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_through_lazy_imports():
    cycle = find_cycle(import_graph(lazy=True))
    assert cycle is None, "import cycle (lazy imports included): " + " -> ".join(cycle)


def test_the_single_file_loader_knows_the_models_and_not_the_other_way():
    graph = import_graph(lazy=True)
    models = {"diffusekit.models.unet_2d_condition", "diffusekit.models.autoencoder_kl"}
    assert models <= graph["diffusekit.loaders.single_file"]
    for module in models | {"diffusekit.loaders.single_file_model"}:
        assert "diffusekit.loaders.single_file" not in graph[module], module
