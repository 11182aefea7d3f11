"""Small helpers for reading and editing torch.fx graphs, shared by the front end and recovery passes."""

from __future__ import annotations

import operator
from typing import Any

from torch import fx, nn


def get_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a call_module node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def single_user(node: fx.Node) -> bool:
    """True when exactly one node consumes `node`'s output."""
    return len(node.users) == 1


def only_user(node: fx.Node) -> fx.Node | None:
    """The one node that consumes `node`'s output, else None."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def replace_module(gm: nn.Module, qualified_name: str, new_module: nn.Module) -> None:
    """Put `new_module` at `qualified_name` (a dotted path) inside `gm` (a GraphModule or any module)."""
    parent_name, _, child_name = qualified_name.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, child_name, new_module)


def outline(gm: fx.GraphModule, nodes: list[fx.Node], prefix: str,
            annotations: dict[fx.Node, Any] | None = None) -> list[str]:
    """Move `nodes` (call_function / call_method) into GraphModule submodules called where they were.

    Nodes are grouped greedily in graph order: a node joins the group of one of its inputs when all its
    other inputs exist before that group starts, so each group can be called at its first node's place
    and no path leaves a group and comes back. `annotations` gives the Python type of non-tensor inputs
    (TorchScript reads untyped arguments as tensors). Returns the new submodules' names.
    """
    annotations = annotations or {}
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    groups: list[list[fx.Node]] = []
    group_of: dict[fx.Node, int] = {}
    for node in sorted(nodes, key=order.__getitem__):
        inputs = node.all_input_nodes
        placed = None
        for candidate in dict.fromkeys(group_of[i] for i in inputs if i in group_of):
            start = order[groups[candidate][0]]
            if all(group_of.get(i) == candidate or order[i] < start for i in inputs):
                placed = candidate
                break
        if placed is None:
            groups.append([])
            placed = len(groups) - 1
        groups[placed].append(node)
        group_of[node] = placed
    names = []
    for members in groups:
        name = _free_name(gm, prefix)
        _outline_group(gm, members, name, annotations)
        names.append(name)
    gm.graph.lint()
    gm.recompile()
    return names


def _free_name(gm: fx.GraphModule, prefix: str) -> str:
    index = 0
    while hasattr(gm, f"{prefix}_{index}"):
        index += 1
    return f"{prefix}_{index}"


def _outline_group(gm: fx.GraphModule, members: list[fx.Node], name: str, annotations: dict[fx.Node, Any]) -> None:
    inside = set(members)
    inputs = list(dict.fromkeys(i for node in members for i in node.all_input_nodes if i not in inside))
    outputs = [node for node in members if any(user not in inside for user in node.users)]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for value in inputs:
        env[value] = graph.placeholder(value.name, type_expr=annotations.get(value))
    for node in members:
        env[node] = graph.node_copy(node, lambda arg: env[arg])
        env[node].type = None
    graph.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[node] for node in outputs))
    gm.add_submodule(name, fx.GraphModule(gm, graph, name))
    with gm.graph.inserting_before(members[0]):
        call = gm.graph.call_module(name, tuple(inputs))
        values = [call] if len(outputs) == 1 else [gm.graph.call_function(operator.getitem, (call, index))
                                                    for index in range(len(outputs))]
    for node, value in zip(outputs, values):
        node.replace_all_uses_with(value, delete_user_cb=lambda user: user not in inside)
    for node in reversed(members):
        gm.graph.erase_node(node)


def restore_output_type(gm: fx.GraphModule, example_output: Any) -> None:
    """Make `gm` return the same mapping type as the float model (torch.fx writes every dict output as a
    plain dict; torchvision's segmentation models return an OrderedDict)."""
    mapping_type = type(example_output)
    if not isinstance(example_output, dict) or mapping_type is dict:
        return
    output = next(node for node in gm.graph.nodes if node.op == "output")
    value = output.args[0]
    if not isinstance(value, dict):
        return
    with gm.graph.inserting_before(output):
        rebuilt = gm.graph.call_function(mapping_type, (list(value.items()),))
    output.args = (rebuilt,)
    gm.graph.lint()
    gm.recompile()
