"""Rewrite third-party layer code in a traced graph into the modules torchvision's models call.

Packages write their layers in ways fxq's pattern tables never see: an `nn.Conv2d` subclass whose own
forward pads and calls `F.conv2d(x, self.weight, ...)` (efficientnet_pytorch's SAME-padding convs, timm's
Conv2dSame), a BatchNorm that calls `F.batch_norm` on its buffers behind a shape assert (timm's
BatchNormAct2d), a weight recomputed from the parameter on every call (timm's StdConv2d), one ReLU6 module
called by every block. Traced, these leave functional ops that BN folding, fusion, equalization and
torch.ao's module swaps do not match, so the layers run float between quantize/dequantize pairs.

`canonicalize_layers` rewrites them in place, one kind after the other (`_PASSES`, in order), into
`call_module` nodes of plain nn.Conv1d/2d/3d, nn.Linear and nn.BatchNorm1d/2d/3d that hold the user's
tensors and are named after the module that owned them. Then the graph is run on the example inputs and
compared with the float outputs from before any rewrite. If they differ, everything is undone and redone
kind by kind with a check after each; a kind that changes the outputs is undone and its rewrites retried
one by one, and whatever still changes them is reported with applied=False, never applied. Rewrites that
fix a value for the traced input shape (SAME padding computed from `x.size()`) say so in `reason`.

Call it on the traced eval-mode graph after eval no-ops are dropped (an nn.Identity left where
efficientnet_pytorch's 1x1 convs keep their padding module would make them read as used elsewhere) and
before pattern finding, BN folding and clamp fusion; eval mode only (PTQ). Leaves it opened (kind
"specialize_shapes") are no longer untraceable: drop them from the float leaves, or the pipeline still
treats those names as untraceable code (float-island plan, report, parts quantized inside leaves).
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_arg

from fxq.config import key_covers
from fxq.frontend.graph import replace_module


@dataclass(frozen=True)
class Canonicalization:
    """One rewrite of third-party layer code, applied or skipped.

    `nodes` are the graph nodes it rewrote (names before the rewrite; the first identifies it), `modules`
    the module paths it created or changed in the graph module. `reason` says why it was skipped, or for
    an applied rewrite what it assumes (the input size a padding was fixed for).
    """

    kind: str
    nodes: tuple[str, ...]
    modules: tuple[str, ...]
    applied: bool
    reason: str = ""

    def __str__(self) -> str:
        where = ", ".join(self.modules or self.nodes)
        if self.applied:
            return f"{self.kind}: {where}" + (f" ({self.reason})" if self.reason else "")
        return f"{self.kind} not applied: {where} ({self.reason})"


def canonicalize_layers(gm: fx.GraphModule, example_inputs: tuple) -> list[Canonicalization]:
    """Rewrite `gm` (traced, eval mode) in place so third-party conv/linear/BatchNorm code and shared
    activation modules look like torchvision's; every rewrite is checked against the float outputs on
    `example_inputs` and undone if it changes them. Returns every rewrite, applied or skipped."""
    if gm.training:
        return [Canonicalization("canonicalize", (), (), False,
                                 "training mode: the float check would update BatchNorm statistics, and "
                                 "folded parameters would stop training")]
    context = _Context(gm, tuple(example_inputs))
    # All kinds first, with one check at the end; only when that fails, kind by kind with a check each.
    before = _Checkpoint(gm)
    done = []
    for rewrite in _PASSES:
        done += rewrite(gm, context, None)
        gm.graph.eliminate_dead_code()  # readers left unused (a removed assert's shape read) block later passes
    _recompile(gm)
    if not any(r.applied for r in done) or context.changed(gm) is None:
        return done
    before.restore(gm)
    return [record for rewrite in _PASSES for record in _apply_checked(gm, context, rewrite)]


# --- checking against float -----------------------------------------------------------------------

# The rewrites compute the same function in another order of floating-point operations (padding inside the
# conv kernel instead of a copy, a weight standardized once instead of per call): equal to within float
# rounding, far above any int8 error.
RTOL, ATOL, SQNR_FLOOR_DB = 1e-4, 1e-5, 60.0


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def _compare(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> str | None:
    """None when `actual` equals `expected` to float rounding, else what differs."""
    if len(actual) != len(expected):
        return f"{len(actual)} output tensors instead of {len(expected)}"
    for index, (e, a) in enumerate(zip(expected, actual)):
        if a.shape != e.shape:
            return f"output {index} has shape {tuple(a.shape)} instead of {tuple(e.shape)}"
        if not e.is_floating_point():
            if not torch.equal(a, e):
                return f"output {index} changed"
            continue
        if torch.allclose(a, e, rtol=RTOL, atol=ATOL):
            continue
        error = (a.double() - e.double()).pow(2).sum().item()
        sqnr = 10 * math.log10(max(e.double().pow(2).sum().item(), 1e-30) / max(error, 1e-30))
        if sqnr < SQNR_FLOOR_DB:
            return f"output {index} changed (SQNR {sqnr:.1f} dB < {SQNR_FLOOR_DB:.0f} dB)"
    return None


@dataclass(frozen=True)
class _TensorShape:
    shape: tuple[int, ...]


_OPAQUE = object()  # a value the recorder does not keep


def _describe(value: Any) -> Any:
    """What the recorder keeps of a value: a tensor's shape, small Python values (sizes) as they are."""
    if isinstance(value, torch.Tensor):
        return _TensorShape(tuple(value.shape))
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (tuple, list)) and len(value) <= 16:
        items = [_describe(item) for item in value]
        if not any(item is _OPAQUE or isinstance(item, _TensorShape) for item in items):
            return type(value)(items)
    return _OPAQUE


class _Recorder(fx.Interpreter):
    """Runs a graph module and keeps, per node name, the shape or small value it produced, and the
    argument values of the nodes named in `capture`."""

    def __init__(self, gm: fx.GraphModule, capture: set[str]) -> None:
        super().__init__(gm)
        self.capture = capture
        self.values: dict[str, Any] = {}
        self.captured: dict[str, tuple[tuple, dict]] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.capture:
            self.captured[n.name] = self.fetch_args_kwargs_from_env(n)
        result = super().run_node(n)
        self.values[n.name] = _describe(result)
        return result


def _grown_batch(example_inputs: tuple) -> tuple:
    """The example inputs with one more sample (the first repeated) in every tensor's first dimension."""
    return tuple(torch.cat([x, x[:1]]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x
                 for x in example_inputs)


class _Context:
    """The example inputs, the float outputs every rewrite is checked against, and recorded runs.

    Rewrites keep the value of every node they leave in place, so a run recorded before them still
    describes those nodes; a node a rewrite created is recorded by running the graph again.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: tuple) -> None:
        self.example_inputs = example_inputs
        with torch.no_grad():
            self.expected = [t.detach().clone() for t in _tensors(gm(*example_inputs))]
        self._runs: dict[bool, _Recorder | None] = {}
        self._same: dict[str, str] = {}  # a node a rewrite created -> the recorded node it replaced

    def replaced(self, new: Any, old: fx.Node) -> None:
        """Note that node `new` computes what the recorded node `old` did."""
        if isinstance(new, fx.Node):
            self._same[new.name] = self._same.get(old.name, old.name)

    def run(self, gm: fx.GraphModule, grown: bool = False) -> _Recorder | None:
        """A recorded run on the example inputs, or on one more sample (None when that does not run:
        a model that only runs at its batch size cannot show a value independent of the batch)."""
        if grown not in self._runs:
            self._runs[grown] = self._record(gm, grown)
        return self._runs[grown]

    def value(self, gm: fx.GraphModule, node: Any) -> Any:
        """What the recorder kept of `node` on the example inputs (None for a non-node)."""
        if not isinstance(node, fx.Node):
            return None
        name = self._same.get(node.name, node.name)
        if name not in self.run(gm).values:
            self._runs[False] = self._record(gm, False)
            self._same.clear()
            name = node.name
        return self._runs[False].values.get(name)

    def _record(self, gm: fx.GraphModule, grown: bool) -> _Recorder | None:
        leaves = {n.name for n in gm.graph.nodes if n.op == "call_module" and _is_weighted_subclass(
            gm.get_submodule(str(n.target)))}
        recorder = _Recorder(gm, leaves)
        inputs = _grown_batch(self.example_inputs) if grown else self.example_inputs
        with torch.no_grad():
            try:
                recorder.run(*inputs)
            except Exception:  # see `run`
                if not grown:
                    raise
                return None
        return recorder

    def changed(self, gm: fx.GraphModule) -> str | None:
        with torch.no_grad():
            try:
                actual = _tensors(gm(*self.example_inputs))
            except Exception as error:  # noqa: BLE001 - a rewrite that breaks the graph is reported
                return f"the rewritten graph fails: {type(error).__name__}: {str(error).splitlines()[0][:150]}"
        return _compare(self.expected, actual)


class _Checkpoint:
    """The graph and the module tree of a graph module, to undo rewrites. Rewrites only add or replace
    entries of modules' `_modules`, `_parameters` and `_buffers` (tensors are never changed in place)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.graph = copy.deepcopy(gm.graph)
        self.modules = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers)) for m in gm.modules()]

    def restore(self, gm: fx.GraphModule) -> None:
        for module, children, parameters, buffers in self.modules:
            for saved, current in ((children, module._modules), (parameters, module._parameters),
                                   (buffers, module._buffers)):
                current.clear()
                current.update(saved)
        gm.graph = copy.deepcopy(self.graph)  # the setter recompiles


Rewriter = Callable[[fx.GraphModule, _Context, "set[str] | None"], list[Canonicalization]]


def _apply_checked(gm: fx.GraphModule, context: _Context, rewrite: Rewriter) -> list[Canonicalization]:
    """Apply one kind of rewrite; undo it if the outputs change, then retry its rewrites one by one."""
    checkpoint = _Checkpoint(gm)
    records = rewrite(gm, context, None)
    applied = [r for r in records if r.applied]
    if not applied:
        return records
    _recompile(gm)
    problem = context.changed(gm)
    if problem is None:
        return records
    checkpoint.restore(gm)
    if len(applied) == 1:
        return [replace(r, applied=False, reason=problem) if r.applied else r for r in records]
    kept = []
    for record in records:
        if not record.applied:
            kept.append(record)
            continue
        checkpoint = _Checkpoint(gm)
        retried = [r for r in rewrite(gm, context, {record.nodes[0]}) if r.applied]
        _recompile(gm)
        problem = context.changed(gm) if retried else "not found again when retried alone"
        if problem is None:
            kept += retried
        else:
            checkpoint.restore(gm)
            kept.append(replace(record, applied=False, reason=problem))
    return kept


def _recompile(gm: fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


# --- small graph helpers -----------------------------------------------------------------------------

def _attribute(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a get_attr node reads, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    owner, _, name = str(node.target).rpartition(".")
    try:
        value = getattr(gm.get_submodule(owner) if owner else gm, name)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


def _has_node(value: Any) -> bool:
    found = []
    map_arg(value, found.append)
    return bool(found)


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any] | None:
    """The call's arguments by name (defaults filled in), or None when they do not fit `names`."""
    if len(node.args) > len(names) or any(key not in names for key in node.kwargs):
        return None
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound if all(name in bound for name in names) else None


def _is_fresh(gm: fx.GraphModule, path: str) -> bool:
    """True for the graph module itself and the empty containers torch.fx made to hold its attributes
    (they belong to the graph module only; the user's modules are shared with the float model)."""
    module = gm.get_submodule(path) if path else gm
    return module is gm or type(module) is nn.Module


def _free_name(parent: nn.Module, base: str, start: int = 0) -> str:
    index = start
    while True:
        name = base if index == 0 else f"{base}_{index}"
        if not hasattr(parent, name):
            return name
        index += 1


def _place(gm: fx.GraphModule, owner: str, base: str, own_inputs: list[fx.Node]) -> tuple[str, bool]:
    """Where a module built from `owner`'s tensors goes, and whether it replaces `owner`: at `owner` when
    nothing else in the graph reads it (module paths then read as in the user's model), else a new
    child of owner's container (`owner.conv`) or a sibling (`owner_1`)."""
    if not owner:  # the model's own parameters
        return _free_name(gm, base), False
    if not any(n.op in ("get_attr", "call_module") and n not in own_inputs and key_covers([owner], str(n.target))
               for n in gm.graph.nodes):
        return owner, True
    if _is_fresh(gm, owner):
        return f"{owner}.{_free_name(gm.get_submodule(owner), base)}", False
    parent, _, last = owner.rpartition(".")
    if _is_fresh(gm, parent):
        return (f"{parent}." if parent else "") + _free_name(gm.get_submodule(parent), last, start=1), False
    return _free_name(gm, f"{owner.replace('.', '_')}_{base}"), False


def _as_parameter(tensor: torch.Tensor, copy_it: bool) -> nn.Parameter:
    if copy_it:
        return nn.Parameter(tensor.detach().clone(), requires_grad=tensor.requires_grad)
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)


def _held_elsewhere(gm: fx.GraphModule, tensor: torch.Tensor, owner: str) -> bool:
    """True when `tensor` is also reachable under another path than `owner` (tied weights)."""
    for name, value in list(gm.named_parameters(remove_duplicate=False)) + \
            list(gm.named_buffers(remove_duplicate=False)):
        if value is tensor and not key_covers([owner], name.rpartition(".")[0]):
            return True
    return False


# --- 1. untraceable conv/linear subclasses: traced again with their input's shape known ----------------

_WEIGHTED_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _is_weighted_subclass(module: nn.Module) -> bool:
    """A conv/linear subclass of another package (torch.ao's QAT and quantized layers are not opened)."""
    return isinstance(module, _WEIGHTED_BASES) and type(module) not in _WEIGHTED_BASES \
        and not type(module).__module__.startswith("torch.ao.")


class _ShapedProxy(fx.Proxy):
    """A proxy whose shape reads (`size()`, `shape`, `dim()`, `ndim`) return the example's numbers."""

    def _example(self) -> Any:
        return self.tracer.values.get(self.node)  # type: ignore[attr-defined]

    def size(self, dim: int | None = None) -> Any:
        value = self._example()
        if not isinstance(value, torch.Tensor):
            return self.tracer.create_proxy("call_method", "size", (self,) + (() if dim is None else (dim,)), {})
        return value.size() if dim is None else value.size(dim)

    def dim(self) -> Any:
        value = self._example()
        return value.dim() if isinstance(value, torch.Tensor) else \
            self.tracer.create_proxy("call_method", "dim", (self,), {})

    @property
    def shape(self) -> Any:
        return self.size()

    @property
    def ndim(self) -> Any:
        return self.dim()


class _ShapeFixingTracer(fx.Tracer):
    """torch.fx's tracer that also runs every op on the example values, so that Python code reading
    shapes (SAME padding from `x.size()`) is decided for the example's shape. Only shapes are made
    concrete: control flow on tensor values still stops the trace."""

    def __init__(self, inputs: tuple) -> None:
        super().__init__()
        self.inputs = list(inputs)
        self.values: dict[fx.Node, Any] = {}

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapedProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,  # torch.fx's signature
                     proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        value_args = map_arg(node.args, self.values.__getitem__)
        value_kwargs = map_arg(node.kwargs, self.values.__getitem__)
        if kind == "placeholder":
            self.values[node] = self.inputs.pop(0) if self.inputs else None
        elif kind == "get_attr":
            self.values[node] = _lookup(self.root, str(target))
        elif kind == "call_function":
            self.values[node] = target(*value_args, **value_kwargs)
        elif kind == "call_method":
            self.values[node] = getattr(value_args[0], target)(*value_args[1:], **value_kwargs)
        elif kind == "call_module":  # a torch.nn leaf; its forward, since tracing patches Module.__call__
            self.values[node] = _lookup(self.root, str(target)).forward(*value_args, **value_kwargs)
        return proxy


def _lookup(root: nn.Module, target: str) -> Any:
    """The attribute at dotted `target`, read from the modules' own tables: while tracing, attribute
    access on a module goes through the tracer, which would record a node for each read."""
    *path, name = target.split(".")
    module = root
    for part in path:
        module = module._modules[part]
    for table in (module._parameters, module._buffers, module._modules):
        if name in table:
            return table[name]
    return module.__dict__.get(name)


def _trace_for_shapes(module: nn.Module, inputs: tuple) -> fx.Graph:
    with torch.no_grad():
        return _ShapeFixingTracer(inputs).trace(module)


def _inline(gm: fx.GraphModule, node: fx.Node, inner: fx.Graph, context: _Context) -> None:
    """Replace the call_module `node` by the nodes of `inner`, its module's traced forward."""
    prefix = str(node.target)
    env: dict[fx.Node, Any] = {}
    inputs = list(node.args)
    stack = dict(node.meta.get("nn_module_stack") or {})
    result: Any = None
    with gm.graph.inserting_before(node):
        for inner_node in inner.nodes:
            if inner_node.op == "placeholder":
                env[inner_node] = inputs.pop(0)
            elif inner_node.op == "output":
                result = map_arg(inner_node.args[0], env.__getitem__)
            else:
                target = f"{prefix}.{inner_node.target}" if inner_node.op in ("get_attr", "call_module") \
                    else inner_node.target
                copied = gm.graph.create_node(inner_node.op, target, map_arg(inner_node.args, env.__getitem__),
                                              map_arg(inner_node.kwargs, env.__getitem__),
                                              name=f"{prefix.replace('.', '_')}_{inner_node.name}")
                copied.meta["nn_module_stack"] = dict(stack)
                env[inner_node] = copied
    node.replace_all_uses_with(result)
    context.replaced(result, node)
    gm.graph.erase_node(node)


def specialize_shapes(gm: fx.GraphModule, context: _Context, only: set[str] | None) -> list[Canonicalization]:
    """Conv/linear subclasses fxq's tracer kept as leaves because their forward branches on the input's
    shape (efficientnet_pytorch's Conv2dDynamicSamePadding, timm's Conv2dSame: `max(pad, 0)` on sizes):
    traced again with the example input's shape, and inlined. Proven for the traced spatial shape only,
    and only when the trace is the same with a batch one larger."""
    candidates = [n for n in gm.graph.nodes if n.op == "call_module" and (only is None or n.name in only)
                  and _is_weighted_subclass(gm.get_submodule(str(n.target)))]
    if not candidates:
        return []
    runs = [context.run(gm), context.run(gm, grown=True)]
    records = []
    for node in candidates:
        module = gm.get_submodule(str(node.target))
        record = Canonicalization("specialize_shapes", (node.name,), (str(node.target),), False)
        if node.kwargs or runs[1] is None:
            records.append(replace(record, reason="called with keyword arguments" if node.kwargs else
                                   "the model does not run with a batch one larger, so the shapes it reads "
                                   "cannot be shown independent of the batch"))
            continue
        try:
            graphs = [_trace_for_shapes(module, run.captured[node.name][0]) for run in runs]
        except Exception as error:  # noqa: BLE001 - reported: control flow on values, not shapes
            records.append(replace(record, reason=f"does not trace with its input's shape known: "
                                                  f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"))
            continue
        if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
            records.append(replace(record, reason="its code depends on the batch size"))
            continue
        (output,) = [n for n in graphs[0].nodes if n.op == "output"]
        if not isinstance(output.args[0], fx.Node) or \
                sum(n.op == "placeholder" for n in graphs[0].nodes) != len(node.args):
            records.append(replace(record, reason="returns several values or takes default arguments"))
            continue
        shape = context.value(gm, node.args[0])
        _inline(gm, node, graphs[0], context)
        size = "x".join(map(str, shape.shape[2:])) if isinstance(shape, _TensorShape) else "?"
        records.append(replace(record, applied=True,
                               reason=f"{type(module).__name__}: shapes fixed for input {size}"))
    return records


# --- 2. shape arithmetic in the graph: constants for the traced shape --------------------------------

_SHAPE_SOURCES_METHODS = frozenset({"size", "dim", "numel"})
_SHAPE_ARITHMETIC = frozenset({operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
                               operator.mod, operator.neg, operator.getitem, operator.eq, operator.ne,
                               operator.lt, operator.le, operator.gt, operator.ge, operator.and_,
                               operator.or_, operator.not_, math.ceil, math.floor, max, min, int, abs, len})
# Only these readers get constants: the pad widths of a pad and the padding of a conv, and asserts (which
# hold for the traced shape and are removed). A view's shape argument is left alone: it may hold the batch.
_PAD_FUNCTIONS = (F.pad, torch.constant_pad_nd)


def _is_shape_source(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _SHAPE_SOURCES_METHODS:
        return True
    return node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
        and node.args[1] in ("shape", "ndim")


def _shape_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    derived: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if _is_shape_source(node) or (node.op == "call_function" and node.target in _SHAPE_ARITHMETIC
                                      and node.all_input_nodes and all(i in derived for i in node.all_input_nodes)):
            derived.add(node)
    return derived


def fold_shape_values(gm: fx.GraphModule, context: _Context, only: set[str] | None) -> list[Canonicalization]:
    """Pad widths computed from `x.size()` in the graph become constants, and `torch._assert` on shapes
    (timm's BatchNormAct2d checks `x.ndim == 4`) is removed: it holds for the traced shape, and its extra
    reader of the conv output would stop BN folding. A value is folded only when it is the same with a
    batch one larger."""
    derived = _shape_nodes(gm)
    asserts = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._assert
               and isinstance(n.args[0], fx.Node) and n.args[0] in derived]
    pads = [n for n in gm.graph.nodes if n.op == "call_function" and (n.target in _PAD_FUNCTIONS
            or n.target in _CONV_FUNCTIONS) and any(i in derived for i in n.all_input_nodes)]
    targets = [n for n in asserts + pads if only is None or n.name in only]
    if not targets:
        return []
    runs = [context.run(gm), context.run(gm, grown=True)]
    records = []
    for node in targets:
        record = Canonicalization("fold_shape_values", (node.name,), (), False)
        readers = [i for i in node.all_input_nodes if i in derived]
        values = [[run.values.get(i.name, _OPAQUE) if run else _OPAQUE for run in runs] for i in readers]
        if any(a is _OPAQUE or a != b for a, b in values):
            records.append(replace(record, reason="its shape arguments depend on the batch size"
                                   if runs[1] is not None else "the model does not run with a batch one larger"))
            continue
        constants = {i: a for i, (a, _) in zip(readers, values)}
        if node.target is torch._assert:
            if constants[node.args[0]] is not True:
                records.append(replace(record, reason="the assert does not hold"))
                continue
            gm.graph.erase_node(node)
            records.append(replace(record, applied=True, reason="shape assert holds for the traced shape"))
            continue
        def constant(i: fx.Node, constants: dict[fx.Node, Any] = constants) -> Any:
            return _plain(constants[i]) if i in constants else i

        node.args, node.kwargs = map_arg(node.args, constant), map_arg(node.kwargs, constant)
        shape = context.value(gm, node.args[0])
        size = "x".join(map(str, shape.shape[2:])) if isinstance(shape, _TensorShape) else "?"
        records.append(replace(record, applied=True, reason=f"padding fixed for input {size}"))
    return records


def _plain(value: Any) -> Any:
    """A recorded value as a graph argument (torch.Size as a plain tuple)."""
    return tuple(value) if isinstance(value, torch.Size) else value


# --- 3. parameter-only subgraphs: computed once ------------------------------------------------------

_NONDETERMINISTIC = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial")


def _pure(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", str(node.target))
    if node.is_impure() or any(word in name for word in _NONDETERMINISTIC):
        return False
    if node.op == "call_method" and name.endswith("_"):
        return False
    if node.target is F.batch_norm:  # training=True with running stats would update them in place
        bound = _bind(node, _BN_ARGS, _BN_DEFAULTS)
        return bound is not None and (not bound["training"] or bound["running_mean"] is None)
    return node.op in ("call_function", "call_method")


def fold_parameters(gm: fx.GraphModule, context: _Context, only: set[str] | None) -> list[Canonicalization]:
    """Ops whose inputs are only parameters, buffers and constants (timm StdConv2d's weight
    standardization) are computed once into a new parameter beside the one they read, so the conv that
    reads it sees a plain weight.

    torch.fx.experimental.const_fold does the same for a whole graph, but it splits the module into
    `submod_*` graphs, keeps the results in one `_FX_CONST_FOLDED_ATTRS` list (names nobody recognizes in
    a report) and computes them lazily on the first forward; the few chains here are simpler to fold by
    hand under the owning module's name.
    """
    from_parameters: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if (node.op == "get_attr" and _attribute(gm, node) is not None) or (
                node.all_input_nodes and all(i in from_parameters for i in node.all_input_nodes) and _pure(node)):
            from_parameters.add(node)
    frontier = [n for n in gm.graph.nodes if n in from_parameters and n.op != "get_attr"
                and any(u not in from_parameters for u in n.users) and (only is None or n.name in only)]
    records = []
    values: dict[fx.Node, Any] = {}
    for node in frontier:
        value = _evaluate(gm, node, values)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue  # shapes of parameters and the like: nothing a conv reads as a weight
        sources = [n for n in _ancestors(node) if n.op == "get_attr"]
        chain = [node.name] + [n.name for n in _ancestors(node) if n.op != "get_attr" and n is not node]
        source = str(sources[0].target)
        owner, _, attribute = source.rpartition(".")
        trainable = any(isinstance(_attribute(gm, s), nn.Parameter) for s in sources)
        holder = owner if owner and _is_fresh(gm, owner) else ""
        name = _free_name(gm.get_submodule(holder) if holder else gm,
                          f"{attribute}_folded" if holder else f"{source.replace('.', '_')}_folded")
        folded = nn.Parameter(value.detach().clone(), requires_grad=False) if trainable else value.detach().clone()
        parent = gm.get_submodule(holder) if holder else gm
        if trainable:
            parent.register_parameter(name, folded)
        else:
            parent.register_buffer(name, folded)
        path = f"{holder}.{name}" if holder else name
        with gm.graph.inserting_before(node):
            read = gm.graph.get_attr(path)
        node.replace_all_uses_with(read)
        records.append(Canonicalization("fold_parameters", tuple(chain), (path,), True,
                                        f"computed once from {', '.join(str(s.target) for s in sources)}"))
    return records


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen: dict[fx.Node, None] = {}
    stack = [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen[current] = None
            stack.extend(current.all_input_nodes)
    return list(seen)


def _evaluate(gm: fx.GraphModule, node: fx.Node, values: dict[fx.Node, Any]) -> Any:
    if node in values:
        return values[node]
    if node.op == "get_attr":
        value = _attribute(gm, node)
    else:
        args = map_arg(node.args, lambda i: _evaluate(gm, i, values))
        kwargs = map_arg(node.kwargs, lambda i: _evaluate(gm, i, values))
        with torch.no_grad():
            value = node.target(*args, **kwargs) if node.op == "call_function" \
                else getattr(args[0], node.target)(*args[1:], **kwargs)
    values[node] = value
    return value


# --- 4. zero-pad modules before a conv: F.pad calls ---------------------------------------------------

_ZERO_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                     nn.ConstantPad3d)


def _feeds_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    user = next(iter(node.users)) if len(node.users) == 1 else None
    if user is None or not user.args or user.args[0] is not node:
        return False
    if user.op == "call_function":
        return user.target in _CONV_FUNCTIONS
    return user.op == "call_module" and type(gm.get_submodule(str(user.target))) in _CONV_TYPES


def pads_as_functions(gm: fx.GraphModule, context: _Context, only: set[str] | None) -> list[Canonicalization]:
    """A zero-pad module whose only reader is a conv becomes an `F.pad` call, so the conv can absorb it
    and the module owning both (efficientnet_pytorch's Conv2dStaticSamePadding) is left holding only the
    weights."""
    records = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or (only is not None and node.name not in only):
            continue
        module = gm.get_submodule(str(node.target))
        if type(module) not in _ZERO_PAD_MODULES or getattr(module, "value", 0.0) != 0 \
                or not _feeds_conv(gm, node) or len(node.args) != 1:
            continue
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(F.pad, (node.args[0], list(module.padding)),
                                          {"mode": "constant", "value": 0.0})
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        context.replaced(call, node)
        gm.graph.erase_node(node)
        records.append(Canonicalization("pad_as_function", (node.name,), (str(node.target),), True))
    return records


# --- 5. functional conv / linear / batch norm: modules ----------------------------------------------

_CONV_FUNCTIONS = {torch.conv1d: nn.Conv1d, torch.conv2d: nn.Conv2d, torch.conv3d: nn.Conv3d,
                   F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
_LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_RANK = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
_BN_TYPES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_BASE_NAMES = {"conv_module": "conv", "linear_module": "linear", "batchnorm_module": "bn"}


@dataclass
class _Built:
    """A module built from a functional call: what it replaces and where its tensors came from."""

    kind: str
    module: nn.Module
    source: Any  # the call's input
    tensors: dict[str, tuple[Any, torch.Tensor | None]]  # module attribute -> (get_attr node, tensor)

    @property
    def reads(self) -> list[fx.Node]:
        return [node for node, _ in self.tensors.values() if isinstance(node, fx.Node)]

    @property
    def owner(self) -> str:
        return str(self.reads[0].target).rpartition(".")[0]


def _conv_padding(padding: Any, kernel: tuple[int, ...], dilation: Any) -> Any:
    """Numeric padding for a conv module; string padding only where it is symmetric ('valid', or 'same'
    with an even total), None otherwise."""
    if not isinstance(padding, str):
        return padding
    if padding == "valid":
        return 0
    dilation = (dilation,) * len(kernel) if isinstance(dilation, int) else tuple(dilation)
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    return tuple(t // 2 for t in totals) if padding == "same" and all(t % 2 == 0 for t in totals) else None


def _build_conv_or_linear(gm: fx.GraphModule, node: fx.Node) -> _Built | str:
    is_conv = node.target in _CONV_FUNCTIONS
    bound = _bind(node, _CONV_ARGS if is_conv else _CONV_ARGS[:3], _CONV_DEFAULTS)
    if bound is None:
        return "unexpected arguments"
    weight, bias = _attribute(gm, bound["weight"]), _attribute(gm, bound["bias"])
    if weight is None or (bound["bias"] is not None and bias is None):
        return "its weight or bias is computed in the graph, not a parameter"
    if not weight.is_floating_point():
        return "integer weight"
    if any(_has_node(bound[k]) for k in _CONV_ARGS[3:] if k in bound):
        return "its stride, padding, dilation or groups are computed in the graph"
    tensors = {"weight": (bound["weight"], weight), "bias": (bound["bias"], bias)}
    if not is_conv:
        if weight.dim() != 2:
            return "weight is not a matrix"
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        return _Built("linear_module", module, bound["input"], tensors)
    module_type = _CONV_FUNCTIONS[node.target]
    if weight.dim() != _CONV_RANK[module_type] + 2:
        return "weight rank does not match the conv"
    kernel = tuple(weight.shape[2:])
    padding = _conv_padding(bound["padding"], kernel, bound["dilation"])
    if padding is None:
        return f"padding={bound['padding']!r} is asymmetric"
    module = module_type(weight.shape[1] * bound["groups"], weight.shape[0], kernel, stride=bound["stride"],
                         padding=padding, dilation=bound["dilation"], groups=bound["groups"],
                         bias=bias is not None, device="meta")
    return _Built("conv_module", module, bound["input"], tensors)


def _build_batchnorm(gm: fx.GraphModule, node: fx.Node, rank: int | None) -> _Built | str:
    bound = _bind(node, _BN_ARGS, _BN_DEFAULTS)
    if bound is None:
        return "unexpected arguments"
    mean, var = _attribute(gm, bound["running_mean"]), _attribute(gm, bound["running_var"])
    weight, bias = _attribute(gm, bound["weight"]), _attribute(gm, bound["bias"])
    if bound["training"] is not False or mean is None or var is None:
        return "normalizes with batch statistics (training=True or no running statistics)"
    if (bound["weight"] is not None and weight is None) or (bound["bias"] is not None and bias is None) \
            or _has_node((bound["momentum"], bound["eps"])):
        return "its affine parameters are computed in the graph"
    if rank not in _BN_TYPES:
        return f"input of rank {rank}"
    affine = weight is not None or bias is not None
    module = _BN_TYPES[rank](mean.numel(), eps=bound["eps"], momentum=bound["momentum"], affine=affine,
                             device="meta")
    tensors = {"running_mean": (bound["running_mean"], mean), "running_var": (bound["running_var"], var)}
    if affine:  # F.batch_norm with only one of them: the other is the identity
        tensors["weight"] = (bound["weight"], weight if weight is not None else torch.ones_like(mean))
        tensors["bias"] = (bound["bias"], bias if bias is not None else torch.zeros_like(mean))
    return _Built("batchnorm_module", module, bound["input"], tensors)


def _fill(gm: fx.GraphModule, built: _Built) -> nn.Module:
    """Give the meta-device module the graph's tensors: copies only where they are also read elsewhere,
    so that recovery passes that scale one layer's weights in place (equalization) leave the other's."""
    module = built.module
    for name, (_, tensor) in built.tensors.items():
        if tensor is None:
            continue
        shared = _held_elsewhere(gm, tensor, built.owner) or any(
            n.op == "get_attr" and n not in built.reads and _attribute(gm, n) is tensor for n in gm.graph.nodes)
        if name in module._parameters:
            setattr(module, name, _as_parameter(tensor, shared))
        else:
            module.register_buffer(name, tensor.detach().clone() if shared else tensor)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_batches_tracked = torch.tensor(0, dtype=torch.long)
    return module.eval()


def functions_as_modules(gm: fx.GraphModule, context: _Context, only: set[str] | None) -> list[Canonicalization]:
    """`F.conv1d/2d/3d`, `F.linear` and eval-mode `F.batch_norm` on parameters become call_module nodes of
    nn.Conv*d / nn.Linear / nn.BatchNorm*d holding the same tensors, named after the module that owned
    them (`conv_stem` for `conv_stem.weight`)."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and (only is None or n.name in only)
             and (n.target in _CONV_FUNCTIONS or n.target in _LINEAR_FUNCTIONS or n.target is F.batch_norm)]
    records = []
    for node in calls:
        if node.target is F.batch_norm:
            shape = context.value(gm, node.args[0] if node.args else node.kwargs.get("input"))
            built = _build_batchnorm(gm, node, len(shape.shape) if isinstance(shape, _TensorShape) else None)
        else:
            built = _build_conv_or_linear(gm, node)
        if isinstance(built, str):
            kind = "batchnorm_module" if node.target is F.batch_norm else \
                "linear_module" if node.target in _LINEAR_FUNCTIONS else "conv_module"
            records.append(Canonicalization(kind, (node.name,), (), False, built))
            continue
        owner = built.owner
        path, replaces = _place(gm, owner, _BASE_NAMES[built.kind], built.reads)
        replace_module(gm, path, _fill(gm, built))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (built.source,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        context.replaced(call, node)
        gm.graph.erase_node(node)
        for read in built.reads:  # they may name attributes of the module just replaced
            if not read.users:
                gm.graph.erase_node(read)
        records.append(Canonicalization(built.kind, (node.name,), (path,), True,
                                        "" if replaces else f"{owner or 'the model'} is also read elsewhere"))
    return records


# --- 6. zero padding before a conv: inside the conv ---------------------------------------------------

_ELEMENTWISE_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU,
                        nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish,
                        nn.Identity)
_ELEMENTWISE_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.hardtanh, F.silu, F.hardswish, F.hardsigmoid,
                          torch.sigmoid, torch.tanh, F.gelu, F.leaky_relu, torch.clamp)


def _zero_pad_widths(node: Any) -> list[int] | None:
    """The pad widths of an `F.pad` with zeros, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _PAD_FUNCTIONS:
        return None
    widths = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0.0)
    if node.target is torch.constant_pad_nd:
        mode, value = "constant", node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    if mode != "constant" or value not in (None, 0, 0.0) or _has_node(widths) or not isinstance(widths, (list, tuple)):
        return None
    return [int(w) for w in widths]


def _conv_with_padding(conv: nn.Module, padding: tuple[int, ...]) -> nn.Module:
    """A new module of `conv`'s type with `padding`, holding the same parameters."""
    module = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                        padding=padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                        device="meta")
    module.weight = conv.weight
    module.bias = conv.bias
    return module.train(conv.training)


# Asymmetric zero padding before a conv: folded as symmetric padding plus a crop (True), or kept as an
# F.pad. torch.ao's native backend config lists neither F.pad nor nn.ZeroPad2d (only its executorch
# config does), so a kept pad runs in float between a dequantize and a quantize, although F.pad on a
# quantized tensor is exact (it pads with the zero point); torch.narrow shares its input's quantization.
CROP_ASYMMETRIC_PADDING = True


def fold_padding(gm: fx.GraphModule, context: _Context, only: set[str] | None) -> list[Canonicalization]:
    """Zero padding read only by a conv goes into the conv's own padding. Symmetric padding is that
    padding; asymmetric padding (TF SAME at stride 2 pads one more on the right and bottom) is padded
    symmetrically to the next width that keeps the conv's sampling phase, and the extra outputs are cut
    off with `torch.narrow` after the conv and the BatchNorm/activation that follow it (exact: zero
    padding is zero padding, and those ops are per element or per channel)."""
    records = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(str(node.target))) not in _CONV_TYPES \
                or (only is not None and node.name not in only):
            continue
        conv = gm.get_submodule(str(node.target))
        pad = node.args[0] if node.args else None
        widths = _zero_pad_widths(pad)
        if widths is None:
            continue
        record = Canonicalization("fold_padding", (node.name, pad.name), (str(node.target),), False)
        rank = len(conv.kernel_size)
        calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target)
        problem = "the padding has other readers" if len(pad.users) != 1 else \
            "the conv module is called more than once" if calls != 1 else \
            "the conv pads with other values than zeros" if conv.padding_mode != "zeros" else \
            "the conv has string padding" if isinstance(conv.padding, str) else \
            "negative padding (a crop)" if any(w < 0 for w in widths) else \
            "pads the batch or channel dimension" if len(widths) > 2 * rank else None
        if problem:
            records.append(replace(record, reason=problem))
            continue
        widths = widths + [0] * (2 * rank - len(widths))
        # F.pad lists (left, right) from the last dimension backwards; conv padding is first dimension first
        pairs = [(widths[2 * j], widths[2 * j + 1]) for j in range(rank)][::-1]
        if all(left == right for left, right in pairs):
            padding = tuple(p + left for p, (left, _) in zip(conv.padding, pairs))
            replace_module(gm, str(node.target), _conv_with_padding(conv, padding))
            node.args = (pad.args[0],) + node.args[1:]
            gm.graph.erase_node(pad)
            records.append(replace(record, applied=True, reason=f"symmetric {tuple(widths)}"))
            continue
        if not CROP_ASYMMETRIC_PADDING:
            records.append(replace(record, reason=f"asymmetric {tuple(widths)}: kept as F.pad"))
            continue
        shape = context.value(gm, pad.args[0])
        if not isinstance(shape, _TensorShape):
            records.append(replace(record, reason="input shape unknown"))
            continue
        padding, crops = [], []
        for j, (left, right) in enumerate(pairs):
            old, stride, dilation = conv.padding[j], conv.stride[j], conv.dilation[j]
            size, reach = shape.shape[len(shape.shape) - rank + j], dilation * (conv.kernel_size[j] - 1) + 1
            wanted = (size + 2 * old + left + right - reach) // stride + 1
            # outputs then read the same inputs when the left padding grows by whole strides (`shift` more
            # outputs in front), and the right one must be at least as wide as before
            shift = 0 if left >= right else -(-(right - left) // stride)
            symmetric = old + left + stride * shift
            produced = (size + 2 * symmetric - reach) // stride + 1
            padding.append(symmetric)
            if shift or produced != wanted:
                crops.append((len(shape.shape) - rank + j, shift, wanted))
        replace_module(gm, str(node.target), _conv_with_padding(conv, tuple(padding)))
        node.args = (pad.args[0],) + node.args[1:]
        gm.graph.erase_node(pad)
        last = node
        users = list(node.users)
        for dim, start, length in crops:
            with gm.graph.inserting_after(last):
                last = gm.graph.call_function(torch.narrow, (last, dim, start, length))
            last.meta = dict(node.meta)
        for user in users:
            user.replace_input_with(node, last)
        _sink_crops(gm, node, last, len(crops))
        records.append(replace(record, applied=True,
                               reason=f"asymmetric {tuple(widths)}: conv padding {tuple(padding)} and narrow "
                                      f"{[(d, s, n) for d, s, n in crops]} after it, for input "
                                      f"{'x'.join(map(str, shape.shape[-rank:]))}"))
    return records


def _is_elementwise(gm: fx.GraphModule, node: fx.Node, source: fx.Node) -> bool:
    if not node.args or node.args[0] is not source or any(isinstance(a, fx.Node) for a in node.args[1:]) \
            or _has_node(node.kwargs):
        return False
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))) in _ELEMENTWISE_MODULES
    return node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS


def _sink_crops(gm: fx.GraphModule, conv: fx.Node, tail: fx.Node, count: int) -> None:
    """Move the `count` narrow nodes ending at `tail` (right after `conv`) past the per-element or
    per-channel ops that follow, so that conv -> BatchNorm -> activation stays a chain fxq folds and fuses."""
    if count == 0:
        return
    head = tail
    for _ in range(count - 1):
        head = head.args[0]
    while len(tail.users) == 1:
        (user,) = tail.users
        if not _is_elementwise(gm, user, tail):
            return
        user.replace_all_uses_with(tail)
        user.args = (conv,) + user.args[1:]
        head.args = (user,) + head.args[1:]
        conv.append(user)
        conv = user


# --- 7. one activation module called from several places: one module per call --------------------

def split_shared_modules(gm: fx.GraphModule, context: _Context, only: set[str] | None) -> list[Canonicalization]:
    """A torch.nn module without parameters or buffers (ReLU6, Hardswish, SiLU, ...) called from several
    places gets a copy per call (`act`, `act_1`, ...), so each conv -> activation pair can fuse."""
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    records = []
    for path, nodes in calls.items():
        module = gm.get_submodule(path)
        if len(nodes) < 2 or not type(module).__module__.startswith("torch.nn.") \
                or any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            continue
        parent_path, _, last = path.rpartition(".")
        if not _is_fresh(gm, parent_path):
            continue
        parent = gm.get_submodule(parent_path) if parent_path else gm
        for node in nodes[1:]:
            if only is not None and node.name not in only:
                continue
            name = _free_name(parent, last, start=1)
            setattr(parent, name, copy.deepcopy(module))
            node.target = f"{parent_path}.{name}" if parent_path else name
            records.append(Canonicalization("split_activation", (node.name,), (path, str(node.target)), True,
                                            f"{type(module).__name__} called {len(nodes)} times"))
    return records


# Order matters: leaves are opened before shape values are folded, parameters are folded before convs
# read them, pad modules become functions before their owner turns into a conv module, and pads are
# folded into conv modules.
def fold_parameter_properties(gm: fx.GraphModule, context: _Context, only: set[str] | None) -> list[Canonicalization]:
    """`self.conv.weight.device` / `.dtype` (EdgeNeXt's and XCiT's positional encodings build tensors on the
    weight's device) become constants: after convert the int8 conv's `weight` is a method, so the read
    fails, and fxq only quantizes CPU float32 models, so the values are known."""
    records = []
    for node in list(gm.graph.nodes):
        source = node.args[0] if node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
            else None
        tensor = _attribute(gm, source)
        if tensor is None or node.args[1] not in ("device", "dtype") or (only is not None and node.name not in only):
            continue
        node.replace_all_uses_with(getattr(tensor, node.args[1]))
        gm.graph.erase_node(node)
        records.append(Canonicalization("fold_parameter_properties", (node.name,), (str(source.target),), True,
                                        f".{node.args[1]} is {getattr(tensor, node.args[1])}"))
    return records


def views_as_reshapes(gm: fx.GraphModule, context: _Context, only: set[str] | None) -> list[Canonicalization]:
    """`x.view(shape)` becomes `x.reshape(shape)`: the same values (a view wherever one is possible), but
    it also takes a channels-last tensor, which is what the int8 convs hand back, where `view` raises
    (flattening a feature map with `x.view(n, -1)` in front of a classifier). `x.view(dtype)`, a
    reinterpretation of the bits, stays."""
    views = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "view" and len(n.args) > 1
             and not isinstance(n.args[1], torch.dtype) and not n.kwargs.get("dtype")
             and (only is None or n.name in only)]
    for node in views:
        node.target = "reshape"
    return [Canonicalization("views_as_reshapes", (node.name,), (), True,
                             "int8 convs return channels-last tensors, which view cannot flatten")
            for node in views]


_PASSES: tuple[Rewriter, ...] = (specialize_shapes, fold_shape_values, fold_parameter_properties, fold_parameters,
                                 pads_as_functions, functions_as_modules, fold_padding, split_shared_modules,
                                 views_as_reshapes)


__all__ = ["Canonicalization", "canonicalize_layers"]
