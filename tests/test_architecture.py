"""The package's import graph: layers import only downward, and no module imports itself back.

The layers, bottom to top, are the architecture of docs/design.md. Every import counts — at module
level or inside a function — except those under ``if TYPE_CHECKING:`` (annotations only).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"

# Bottom to top; a module may import its own package and anything in a lower layer.
LAYERS = [
    ["errors", "method"],  # the method registry and its errors
    ["positions"],  # RoPE tables, segments, position methods
    ["attention"],  # the segmented kernel and its device backends
    ["cache"],  # KV cache layers and policies
    ["prefill"],  # sparse prefill: approximate attention over long prompts
    ["data", "loading", "generation"],  # shared data; checkpoint loading; greedy answers through any model
    ["context"],  # context processing: the input is changed, not the model
    ["spec"],  # the spec language over all methods
    ["bridge"],  # apply / reset / describe on a transformers model
    ["parallel"],  # sequence parallelism over a patched model
    ["eval"],  # tasks, metrics, runner, reports
    ["bundled"],  # the bundled model's pipeline (trains and evaluates it)
    ["training", "lab"],  # fine-tuning; models trained from scratch (both reuse the bundled pipeline's pieces)
    ["cli"],  # the command line
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("longlab"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("longlab"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in (SOURCE / "longlab").rglob("*.py")}
    return {name: _imports(ast.parse(path.read_text()), set(paths)) - {name} for name, path in paths.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "longlab"


GRAPH = _graph()


def test_every_package_has_a_layer():
    assert {_part(m) for m in GRAPH} - {"longlab"} <= set(LAYER)


def _upward(graph: dict[str, set[str]], module: str) -> list[str]:
    own = _part(module)
    return sorted(
        target
        for target in graph[module]
        if _part(target) != own and (_part(target) == "longlab" or LAYER[_part(target)] > LAYER[own])
    )


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                found.append([*path[path.index(target) :], target])
            elif target in graph and target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "longlab"))
def test_imports_run_only_downward(module):
    assert not _upward(GRAPH, module), f"{module} (layer {LAYER[_part(module)]}) imports higher layers"


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checks_catch_an_upward_import_and_a_cycle():
    """The checks above can fail: synthetic violations are caught; annotation-only imports are not."""
    tree = ast.parse("from longlab.bridge import apply\nif TYPE_CHECKING:\n    from longlab.cli import main\n")
    assert _imports(tree, {"longlab.bridge"}) == {"longlab.bridge"}
    graph = {"longlab.attention.kernel": {"longlab.bridge.patch"}, "longlab.bridge.patch": {"longlab.attention.kernel"}}
    assert _upward(graph, "longlab.attention.kernel") == ["longlab.bridge.patch"]
    assert _cycles(graph) == [["longlab.attention.kernel", "longlab.bridge.patch", "longlab.attention.kernel"]]
