"""Small helpers for reading and editing torch.fx graphs, shared by the front end and recovery passes."""

from __future__ import annotations

from typing import Iterator

from torch import fx, nn


def get_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a call_module node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def single_user(node: fx.Node) -> bool:
    """True when exactly one node consumes `node`'s output."""
    return len(node.users) == 1


def replace_module(gm: fx.GraphModule, qualified_name: str, new_module: nn.Module) -> None:
    """Put `new_module` at `qualified_name` (a dotted path) inside `gm`."""
    parent_name, _, child_name = qualified_name.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, child_name, new_module)


def module_nodes(gm: fx.GraphModule, types: type | tuple[type, ...]) -> Iterator[tuple[fx.Node, nn.Module]]:
    """(node, module) for every call_module node whose module is an instance of `types`."""
    for node in gm.graph.nodes:
        module = get_module(gm, node)
        if module is not None and isinstance(module, types):
            yield node, module
