"""The import graph of `kvdepot`: no cycles, and no upward imports along the layers
cli -> connectors -> blend -> engine -> store -> tiers/codec -> keys (imports inside
functions count).
"""

from __future__ import annotations

import ast
import graphlib
from collections import defaultdict
from pathlib import Path

import kvdepot

SRC = Path(kvdepot.__file__).parent
LAYERS = [["cli"], ["connectors"], ["blend"], ["engine"], ["store"], ["tiers", "codec"], ["keys"]]
"""Top-level parts of the package, highest first: a part may import only parts below it."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*head, *([node.module] if node.module else [])])
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_graph_sees_imports_inside_functions() -> None:
    graph = _graph()
    assert "kvdepot.tiers.valkey" in graph["kvdepot.store"]  # imported inside open_store
    assert "kvdepot.engine" in graph["kvdepot.connectors.transformers"]


def test_modules_and_parts_import_each_other_without_cycles() -> None:
    graph = _graph()
    graphlib.TopologicalSorter(graph).prepare()  # CycleError names the cycle
    parts: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        parts[_part(module)] |= {_part(t) for t in targets} - {_part(module)}
    graphlib.TopologicalSorter(parts).prepare()


def test_no_layer_imports_a_layer_above_it() -> None:
    rank = {part: i for i, layer in enumerate(LAYERS) for part in layer}
    upward = [
        (module, target)
        for module, targets in _graph().items()
        for target in targets
        if _part(module) in rank
        and _part(target) in rank
        and rank[_part(target)] < rank[_part(module)]
    ]
    assert upward == []
