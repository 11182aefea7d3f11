"""fxq's imports run one way: errors/config -> frontend, backend, recovery -> pipeline -> analysis ->
mixed precision -> api. A lower layer never imports a higher one, not even lazily, and no module imports
itself through others (imports under `if TYPE_CHECKING:` are annotations, not imports, and are skipped).
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fxq"

# Module name prefixes by layer, lowest first; a module belongs to the layer of its longest matching prefix.
LAYERS = [
    # no fxq logic above plain data and arithmetic: every layer may use these
    ["fxq.errors", "fxq.config", "fxq.validate", "fxq.calibration", "fxq.samples", "fxq.summary",
     "fxq.analysis.metrics", "fxq.report.latency"],
    ["fxq.frontend", "fxq.backend", "fxq.recovery"],
    ["fxq.summary.assembly", "fxq.regions", "fxq.shared_inputs"],
    ["fxq.pipeline"],
    ["fxq.analysis"],
    ["fxq.mixed_precision"],
    ["fxq.api"],
    ["fxq.report", "fxq.export", "fxq.serialize", "fxq.cli", "fxq.__main__", "fxq"],
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported_modules(tree: ast.AST, known: set[str]) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fxq":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "fxq")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _import_graph() -> nx.DiGraph:
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    for module, path in files.items():
        graph.add_node(module)
        for imported in _imported_modules(ast.parse(path.read_text()), set(files)):
            if imported != module:
                graph.add_edge(module, imported)
    return graph


def _layer(module: str) -> int:
    matches = [(len(prefix), index) for index, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer; add it to LAYERS"
    return max(matches)[1]


def test_the_import_graph_has_no_cycle():
    cycles = list(nx.simple_cycles(_import_graph()))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_no_module_imports_a_higher_layer():
    upward = [(module, imported) for module, imported in _import_graph().edges
              if _layer(imported) > _layer(module)]
    assert not upward, f"imports of a higher layer: {upward}"


@pytest.mark.parametrize("module", ["fxq.frontend.rewrite", "fxq.recovery.rounding", "fxq.pipeline"])
def test_the_checker_sees_imports(module):
    """The graph is not empty by mistake: these modules do import other fxq modules."""
    assert list(_import_graph().successors(module))


def test_only_the_backend_imports_torch_ao():
    """torch.ao.quantization is deprecated upstream: one package holds every use of it."""
    outside = []
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(PACKAGE / "backend"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            outside += [f"{_module_name(path)}: {name}" for name in names if name.startswith("torch.ao")]
    assert not outside, outside
