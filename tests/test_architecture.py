"""The layering of docs/architecture.md, enforced: a module imports its own layer or the layers
below it, never one above (imports inside functions count too), and no two modules import each
other. A new module must be placed in a layer here, so the map cannot silently go stale."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vsearch_tf"

# Lowest first; a module is named by its dotted path under vsearch_tf, a package's modules by
# the package name ("index" covers vsearch_tf.index.*), the most specific entry winning.
LAYERS: list[set[str]] = [
    {"errors", "io", "config", "data"},  # data = the package's constants (data/__init__.py)
    {"data.tables", "data.images", "data.pipeline", "data.sampling", "data.prepared"},
    {
        "data.convert",
        "data.split",
        "data.synth",
        "demo",
        "models",
        "losses",
        "index",
        "metrics",
        "rerank",
    },
    {"callbacks", "inference", "viz"},
    {"train", "localizer_train", "export", "litert", "beam", "evaluation"},
    {"workflows", "recipe", "serving"},
    {"cli", "__main__", ""},  # "" = vsearch_tf/__init__.py
]


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    """The layer of the most specific entry that ``module`` is or lies under."""
    best, depth = None, -1
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            inside = module == entry or (entry and module.startswith(entry + "."))
            if inside and entry.count(".") + (entry != "") > depth:
                best, depth = i, entry.count(".") + (entry != "")
    assert best is not None, f"vsearch_tf.{module} is in no layer: add it to LAYERS and the map"
    return best


def _imports(path: Path) -> set[str]:
    """The vsearch_tf modules ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "vsearch_tf":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("vsearch_tf."):
                found.add(node.module.removeprefix("vsearch_tf."))
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("vsearch_tf.")
                for a in node.names
                if a.name.startswith("vsearch_tf.")
            }
    return found


def _graph() -> dict[str, set[str]]:
    return {_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_module_imports_a_layer_above_its_own():
    upward = [
        f"vsearch_tf.{module} (layer {_layer(module)}) imports vsearch_tf.{target} "
        f"(layer {_layer(target)})"
        for module, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_two_modules_import_each_other():
    graph = _graph()
    both = sorted(
        f"{a} <-> {b}" for a, targets in graph.items() for b in targets if a in graph.get(b, ())
    )
    assert not [pair for pair in both if pair.split(" <-> ")[0] != pair.split(" <-> ")[1]], both
