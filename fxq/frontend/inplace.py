"""Make in-place ops out of place before quantizing, so the int8 model computes what the float model does.

torch.fx records `u.add_(v); return u` as a node whose result nothing reads: the mutation is only visible
through `u`. Dead-code elimination (in torch.ao's convert and in fxq's own rewrites) then drops the add,
and the int8 model silently computes something else. `remove_inplace_ops` rewrites every in-place op to
its out-of-place twin and makes every later reader of the mutated tensor read the op's result instead;
earlier readers keep the value from before the mutation, as in eager execution (graph order is
execution order).

That rewiring is only exact when nothing else can observe the mutation: the mutated tensor must be
computed inside the graph (not a model input, which the caller sees change, nor a parameter or buffer,
which persists across calls), and must not share memory with another tensor the graph reads (a view,
a slice, or an op that may return its input). Anything else raises `TraceError` naming the node.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.errors import TraceError

__all__ = ["InplaceRewrite", "remove_inplace_ops", "describe_rewrites", "state_versions", "check_state_kept",
           "OUT_OF_PLACE_FUNCTIONS"]

# in-place function -> out-of-place twin (same arguments)
OUT_OF_PLACE_FUNCTIONS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
    operator.iand: operator.and_, operator.ior: operator.or_, operator.ixor: operator.xor,
    operator.ipow: operator.pow, operator.imatmul: operator.matmul,
    torch.relu_: torch.relu, F.relu_: F.relu, torch.sigmoid_: torch.sigmoid, torch.tanh_: torch.tanh,
    F.hardtanh_: F.hardtanh, F.leaky_relu_: F.leaky_relu, F.elu_: F.elu, F.rrelu_: F.rrelu,
    F.threshold_: F.threshold, F.celu_: F.celu, F.selu_: F.selu,
}
# In-place methods without a same-named out-of-place method, and what replaces them (None: refused).
SPECIAL_METHODS = {"zero_": torch.zeros_like, "fill_": torch.full_like}

# Ops whose result may share memory with their first input (views, or ops that may return the input itself
# such as `contiguous` or `to`): mutating such a result would also change the input, so it is refused.
ALIAS_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t", "flatten", "unflatten", "squeeze",
    "unsqueeze", "expand", "expand_as", "narrow", "select", "split", "chunk", "unbind", "movedim", "moveaxis",
    "swapaxes", "swapdims", "diagonal", "as_strided", "contiguous", "detach", "to", "type", "type_as", "float",
    "real", "imag", "unfold", "split_with_sizes", "tensor_split", "__getitem__", "data", "mT", "T",
})
ALIAS_FUNCTIONS = frozenset({
    torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute, torch.t,
    torch.narrow, torch.select, torch.split, torch.chunk, torch.unbind, torch.movedim, torch.swapaxes,
    torch.diagonal, torch.as_strided, torch.detach, torch.tensor_split, operator.getitem,
})
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten) + DROPOUT_MODULES


@dataclass(frozen=True)
class InplaceRewrite:
    """One in-place op made out of place: its node, and how many later readers now read its result."""

    node: str
    op: str
    rewired_readers: int


def _op_label(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(str(node.target))).__name__}(inplace=True) '{node.target}'"
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def _inplace_argument(fn: object, node: fx.Node) -> tuple[str, int] | None:
    """(parameter name, position) of a function's `inplace` flag when this call sets it, else None."""
    try:
        parameters = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    if "inplace" not in parameters:
        return None
    position = parameters.index("inplace")
    value = node.kwargs.get("inplace", node.args[position] if len(node.args) > position else False)
    return ("inplace", position) if value is True else None


def _is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        # eval-mode dropout returns its input untouched, whatever its inplace flag
        return getattr(module, "inplace", False) is True and not (isinstance(module, DROPOUT_MODULES)
                                                                   and not module.training)
    if node.op == "call_function":
        return node.target in OUT_OF_PLACE_FUNCTIONS or _inplace_argument(node.target, node) is not None
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_")
    return False


def _may_alias(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when `node`'s value may share memory with a tensor computed elsewhere."""
    if node.op == "call_method":
        return node.target in ALIAS_METHODS
    if node.op == "call_function":
        if node.target is operator.getitem:
            # an integer index into a module's output is taken to pick an element of its tuple (a tensor of
            # its own); any other index, or an index into an op's result, may be a view
            source, index = node.args[0], node.args[1]
            return not (isinstance(source, fx.Node) and source.op == "call_module" and isinstance(index, int))
        return node.target in ALIAS_FUNCTIONS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), ALIAS_MODULES)
    return False


def _refuse(node: fx.Node, label: str, what: str) -> TraceError:
    return TraceError(f"{node.name}: in-place {label} mutates {what}; fxq cannot reproduce that side effect "
                      "in the int8 model (torch.ao's convert drops in-place ops whose result is unused). Write "
                      "it out of place (y = x.add(z) instead of x.add_(z), ReLU(inplace=False))")


def _alias_class(gm: fx.GraphModule, tensor: fx.Node) -> tuple[fx.Node, set[fx.Node]]:
    """The node `tensor` is (transitively) a view of, and every node that may share its memory."""
    base = tensor
    while _may_alias(gm, base) and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    members, stack = {base}, [base]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user not in members and _may_alias(gm, user) and user.args and user.args[0] is node:
                members.add(user)
                stack.append(user)
    return base, members


def _check_target(gm: fx.GraphModule, node: fx.Node, target: object, label: str,
                  order: dict[fx.Node, int]) -> fx.Node:
    if not isinstance(target, fx.Node):
        raise _refuse(node, label, f"a value that is not a graph tensor ({target!r})")
    base, members = _alias_class(gm, target)
    if base.op == "placeholder":
        raise _refuse(node, label, f"the model input '{base.target}' (the caller would see it change)")
    if base.op == "get_attr":
        raise _refuse(node, label, f"the parameter or buffer '{base.target}' (it persists across calls)")
    # Later readers of `target` itself are rewired; a later reader of a tensor sharing its memory cannot be.
    for member in sorted(members - {target}, key=order.__getitem__):
        for user in member.users:
            if user is not node and user not in members and order[user] > order[node]:
                raise _refuse(node, label, f"'{target.name}', which shares memory with '{member.name}' (a view "
                                           f"or an op that can return its input), read later by '{user.name}'")
    return target


def _make_out_of_place(gm: fx.GraphModule, node: fx.Node, label: str) -> None:
    if node.op == "call_module":
        return  # the module's inplace flag is cleared once for all its calls
    if node.op == "call_function":
        if node.target in OUT_OF_PLACE_FUNCTIONS:
            node.target = OUT_OF_PLACE_FUNCTIONS[node.target]
            return
        _name, position = _inplace_argument(node.target, node)
        if len(node.args) > position:
            node.args = node.args[:position] + (False,) + node.args[position + 1:]
        else:
            node.kwargs = {**node.kwargs, "inplace": False}
        return
    name = str(node.target)
    if name in SPECIAL_METHODS:
        node.op, node.target = "call_function", SPECIAL_METHODS[name]
        return
    twin = getattr(torch.Tensor, name[:-1], None)
    if not callable(twin):
        raise _refuse(node, label, f"'{node.args[0]}' and has no out-of-place form fxq knows")
    node.target = name[:-1]


def remove_inplace_ops(gm: fx.GraphModule) -> list[InplaceRewrite]:
    """Rewrite every in-place op of `gm` out of place, rewiring later readers of the mutated tensor.

    Raises TraceError (naming the node) when the mutation could be observed some other way. `gm` must be
    fxq's own traced copy: in-place modules have their `inplace` flag cleared.
    """
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    rewrites, inplace_modules = [], set()
    for node in list(gm.graph.nodes):
        if not _is_inplace(gm, node):
            continue
        label = _op_label(gm, node)
        target = _check_target(gm, node, node.args[0] if node.args else None, label, order)
        later = [user for user in target.users if user is not node and order[user] > order[node]]
        for user in later:
            user.replace_input_with(target, node)
        _make_out_of_place(gm, node, label)
        if node.op == "call_module":
            inplace_modules.add(str(node.target))
        rewrites.append(InplaceRewrite(node.name, label, len(later)))
    for name in inplace_modules:
        gm.get_submodule(name).inplace = False
    gm.graph.lint()
    gm.recompile()
    return rewrites


def describe_rewrites(rewrites: list[InplaceRewrite]) -> list[str]:
    """One line per in-place op whose later readers were rewired; the plain ones (ReLU(inplace=True) on a
    tensor nothing else reads) counted on one line."""
    lines = [f"out_of_place: {r.node} ({r.op}; {r.rewired_readers} later reader(s) now read its result)"
             for r in rewrites if r.rewired_readers]
    plain = [r.node for r in rewrites if not r.rewired_readers]
    if plain:
        lines.append(f"out_of_place: {len(plain)} in-place op(s) with no later reader "
                     f"({', '.join(plain[:3])}{', ...' if len(plain) > 3 else ''})")
    return lines


def state_versions(model: nn.Module) -> dict[str, int]:
    """The in-place version counter of every parameter and buffer (it grows with each in-place write)."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {name: tensor._version for name, tensor in tensors}


def check_state_kept(model: nn.Module, before: dict[str, int]) -> None:
    """Raise TraceError when a forward wrote a parameter or buffer in place since `before` was taken.

    Such writes run once while torch.fx traces (the tensor is a constant there, not a graph value), so
    the int8 model would silently never repeat them.
    """
    changed = [name for name, version in state_versions(model).items() if before.get(name, version) != version]
    if changed:
        raise TraceError(f"{changed[0]}: the model's forward writes this parameter or buffer in place"
                         f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}; torch.fx runs such a "
                         "write once while tracing and the int8 model would never repeat it. Move the update out "
                         "of forward (or return the new value instead of storing it)")
