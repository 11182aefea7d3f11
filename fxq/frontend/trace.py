"""Symbolic tracing with automatic float leaves for code that cannot be traced.

Data-dependent control flow, shape asserts and non-torch calls stop torch.fx. Instead of failing, fxq
finds the smallest submodules whose own forward cannot be traced, keeps them as opaque float leaves, and
records why; the rest of the model is traced and quantized. The leaves are reported, never hidden.
`find_regions` serves the opposite case, a model (or a leaf) whose own forward does not trace: it lists
the largest traceable submodules inside, which fxq quantizes one by one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import fx, nn

from fxq.errors import TraceError


@dataclass(frozen=True)
class FloatLeaf:
    """A submodule kept in float because its forward could not be traced."""

    module: str
    reason: str


class LeafTracer(fx.Tracer):
    """torch.fx's default tracer plus a set of qualified names that are called, not traced into."""

    def __init__(self, leaf_names: set[str]) -> None:
        super().__init__()
        self.leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names:
            return True
        # fused containers (torch.ao.nn.intrinsic) are sequential but must stay whole
        if type(m).__module__.startswith("torch.ao.nn"):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(tracer: fx.Tracer, module: nn.Module) -> fx.Graph:
    """`tracer.trace(module)`, leaving the module's plain dict and list attributes as they were: a forward
    that caches a computed tensor there (timm's LeViT and EfficientFormer keep attention biases in a dict
    in eval mode) would otherwise hand the next trace a value of this trace's graph."""
    saved = [(value, copy.copy(value)) for m in module.modules() for key, value in vars(m).items()
             if not key.startswith("_") and isinstance(value, (dict, list))]
    try:
        return tracer.trace(module)
    finally:
        for value, before in saved:
            if isinstance(value, dict) and value != before:
                value.clear()
                value.update(before)
            elif isinstance(value, list) and value != before:
                value[:] = before


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _trace_error(module: nn.Module, leaf_names: set[str], prefix: str) -> BaseException | None:
    """The exception tracing `module` raises (with `leaf_names` as leaves), or None when it traces."""
    local_leaves = {name[len(prefix):] for name in leaf_names if name.startswith(prefix)}
    try:
        _trace(LeafTracer(local_leaves), module)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is what we are looking for
        return exc
    return None


def _find_blockers(module: nn.Module, name: str, leaf_names: set[str]) -> list[FloatLeaf]:
    """Smallest descendants of `module` (named `name`) whose forward does not trace."""
    prefix = f"{name}." if name else ""
    blockers: list[FloatLeaf] = []
    for child_name, child in module.named_children():
        full_name = prefix + child_name
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # never called itself: look at its items
            blockers.extend(_find_blockers(child, full_name, leaf_names))
            continue
        if full_name in leaf_names or LeafTracer(set()).is_leaf_module(child, full_name):
            continue
        if _trace_error(child, leaf_names, full_name + ".") is None:
            continue
        inner = _find_blockers(child, full_name, leaf_names)
        if inner:
            blockers.extend(inner)
            leaf_names.update(b.module for b in inner)
            if _trace_error(child, leaf_names, full_name + ".") is None:
                continue
        error = _trace_error(child, leaf_names, full_name + ".")
        blockers.append(FloatLeaf(full_name, _first_line(error) if error else "does not trace in context"))
        leaf_names.add(full_name)
    return blockers


def trace_model(model: nn.Module, extra_leaves: set[str] | None = None) -> tuple[fx.GraphModule, list[FloatLeaf]]:
    """Trace `model`; submodules that block tracing become float leaves. Raises TraceError if the
    top-level forward itself cannot be traced (nothing smaller to isolate)."""
    leaf_names = set(extra_leaves or ())
    leaves: list[FloatLeaf] = []
    error = _trace_error(model, leaf_names, "")
    if error is not None:
        leaves = _find_blockers(model, "", leaf_names)
        error = _trace_error(model, leaf_names, "")
    if error is not None:
        raise TraceError(
            f"{type(model).__name__}.forward cannot be traced symbolically ({_first_line(error)}); the failure "
            "is in the top-level forward, not in a submodule fxq could keep in float. Move the data-dependent "
            "code into a submodule, or quantize a traceable submodule instead"
        ) from error
    graph = _trace(LeafTracer(leaf_names), model)
    for node in graph.nodes:
        # Annotations are copied into generated code; a postponed one ('torch.Tensor' as a string under
        # `from __future__ import annotations`) becomes a name TorchScript cannot resolve when saving.
        node.type = None
    return fx.GraphModule(model, graph, type(model).__name__), leaves


_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _holds_weights(module: nn.Module) -> bool:
    return any(isinstance(m, _WEIGHTED) for m in module.modules())


def find_regions(model: nn.Module, reason: str) -> tuple[list[str], list[FloatLeaf]]:
    """For a model whose own forward cannot be traced (`reason`): the largest submodules that trace without
    keeping any conv/linear layer in a float leaf (each is quantized on its own), and the modules around
    them, which run as the model's own Python code in float. A submodule that traces only by keeping
    weighted blocks float is opened up instead, so the traceable parts of those blocks are found too."""
    regions: list[str] = []
    around = [FloatLeaf("", reason)]

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = prefix + child_name
            if not _holds_weights(child):
                continue
            if isinstance(child, _WEIGHTED):
                regions.append(name)
                continue
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # never called itself: its items are
                visit(child, name + ".")
                continue
            try:
                _, leaves = trace_model(child)
            except TraceError as error:
                around.append(FloatLeaf(name, _first_line(error.__cause__ or error)))
                visit(child, name + ".")
                continue
            if any(_holds_weights(child.get_submodule(leaf.module)) for leaf in leaves):
                around.append(FloatLeaf(name, "traces only with conv/linear blocks kept float inside: "
                                              + "; ".join(f"{leaf.module}: {leaf.reason}" for leaf in leaves)[:200]))
                visit(child, name + ".")
            else:
                regions.append(name)

    visit(model, "")
    return regions, around
