"""Symbolic tracing with automatic float leaves for code that cannot be traced.

Data-dependent control flow, shape asserts and non-torch calls stop torch.fx. Instead of failing, fxq
finds the smallest submodules whose own forward cannot be traced, keeps them as opaque float leaves, and
records why; the rest of the model is traced and quantized. The leaves are reported, never hidden. A
submodule probed alone has its optional arguments bound to their defaults when it traces only so (its
caller passes constants there); the final trace of the whole model checks that it traces in context.
`find_regions` serves the opposite case, a model (or a leaf) whose own forward does not trace: it lists
the largest traceable submodules inside, which fxq quantizes one by one.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass
from typing import Any

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
        # fused containers (torch.ao.nn.intrinsic) are sequential but must stay whole; int8 modules
        # (torch.ao's, fxq's dynamic Linear) are kernels
        if type(m).__module__.startswith(("torch.ao.nn", "fxq.backend.")):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(tracer: fx.Tracer, module: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
    """`tracer.trace(module, concrete_args)`, leaving the module's plain dict and list attributes as they
    were: a forward that caches a computed tensor there (timm's LeViT and EfficientFormer keep attention
    biases in a dict in eval mode) would otherwise hand the next trace a value of this trace's graph."""
    saved = [(value, copy.copy(value)) for m in module.modules() for key, value in vars(m).items()
             if not key.startswith("_") and isinstance(value, (dict, list))]
    try:
        return tracer.trace(module, concrete_args)
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


def _trace_error(module: nn.Module, leaf_names: set[str], prefix: str,
                 concrete_args: dict[str, Any] | None = None) -> BaseException | None:
    """The exception tracing `module` raises (with `leaf_names` as leaves, `concrete_args` bound), or None
    when it traces."""
    local_leaves = {name[len(prefix):] for name in leaf_names if name.startswith(prefix)}
    try:
        with warnings.catch_warnings():  # fx warns it cannot guard a bound tuple or dict default: a probe
            warnings.simplefilter("ignore")
            _trace(LeafTracer(local_leaves), module, concrete_args)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is what we are looking for
        return exc
    return None


def _optional_arguments(module: nn.Module) -> dict[str, Any]:
    """The default values of `module.forward`'s optional arguments after its first one (efficientnet_pytorch's
    `MBConvBlock.forward(inputs, drop_connect_rate=None)`), as torch.fx `concrete_args`. Traced alone, a
    submodule gets a Proxy for each of them, and `if drop_connect_rate:` stops the trace; its parent passes
    constants or nothing there. The first argument is the module's input and always stays a Proxy."""
    forward = inspect.unwrap(module.forward)
    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C-implemented forward: nothing to bind
        return {}
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in parameters[1:]
            if p.kind in named and p.default is not inspect.Parameter.empty}


def _find_blockers(module: nn.Module, name: str, leaf_names: set[str], bound: set[str] | None) -> list[FloatLeaf]:
    """Smallest descendants of `module` (named `name`) whose forward does not trace. Given a set `bound`,
    a descendant that traces only with its optional arguments bound to their defaults is no blocker (traced
    in its parent, it gets the values the parent passes; the caller checks that the parent then traces) and
    its name is added to `bound`."""
    prefix = f"{name}." if name else ""
    blockers: list[FloatLeaf] = []

    def trace_error(child: nn.Module, full_name: str) -> BaseException | None:
        error = _trace_error(child, leaf_names, full_name + ".")
        defaults = _optional_arguments(child) if error is not None and bound is not None else {}
        if defaults and _trace_error(child, leaf_names, full_name + ".", defaults) is None:
            bound.add(full_name)
            return None
        return error

    for child_name, child in module.named_children():
        full_name = prefix + child_name
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # never called itself: look at its items
            blockers.extend(_find_blockers(child, full_name, leaf_names, bound))
            continue
        if full_name in leaf_names or LeafTracer(set()).is_leaf_module(child, full_name):
            continue
        error = trace_error(child, full_name)
        if error is None:
            continue
        inner = _find_blockers(child, full_name, leaf_names, bound)
        if inner:
            blockers.extend(inner)
            leaf_names.update(b.module for b in inner)
            error = trace_error(child, full_name)  # again, with the blockers inside it as leaves
            if error is None:
                continue
        blockers.append(FloatLeaf(full_name, _first_line(error)))
        leaf_names.add(full_name)
    return blockers


def trace_model(model: nn.Module, extra_leaves: set[str] | None = None) -> tuple[fx.GraphModule, list[FloatLeaf]]:
    """Trace `model`; submodules that block tracing become float leaves. Raises TraceError if the
    top-level forward itself cannot be traced (nothing smaller to isolate)."""
    leaf_names = set(extra_leaves or ())
    leaves: list[FloatLeaf] = []
    error = _trace_error(model, leaf_names, "")
    bound: set[str] = set()
    if error is not None:
        leaves = _find_blockers(model, "", leaf_names, bound)
        error = _trace_error(model, leaf_names, "")
    if error is not None and bound:
        # a submodule that traced alone with its defaults bound may get other values in context (a Proxy it
        # branches on): search again with every optional argument a Proxy, as the caller's may be
        leaf_names = set(extra_leaves or ())
        leaves = _find_blockers(model, "", leaf_names, None)
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
