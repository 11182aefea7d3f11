"""Find the patterns worth fusing or handling with care in a traced float graph.

Patterns are data (`PATTERNS`): a name and a sequence of node matchers; `find_patterns` walks the graph
and matches chains whose inner nodes have a single user. What it finds is shown by `fxq.inspect` and in
the report.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.frontend.graph import get_module

Matcher = Callable[[fx.GraphModule, fx.Node], bool]


def _module(*types: type) -> Matcher:
    return lambda gm, node: isinstance(get_module(gm, node), types)


def _function(*targets: Callable) -> Matcher:
    return lambda gm, node: node.op == "call_function" and node.target in targets


def _method(*names: str) -> Matcher:
    return lambda gm, node: node.op == "call_method" and node.target in names


def _any(*matchers: Matcher) -> Matcher:
    return lambda gm, node: any(m(gm, node) for m in matchers)


CONV = _module(nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN = _module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
LINEAR = _module(nn.Linear)
RELU = _any(_module(nn.ReLU), _function(F.relu, torch.relu), _method("relu", "relu_"))
CLAMP = _any(_module(nn.ReLU6, nn.Hardtanh), _function(F.relu6, F.hardtanh, torch.clamp, torch.clip),
             _method("clamp", "clip"))
ADD = _any(_function(operator.add, torch.add), _method("add", "add_"))
CAT = _function(torch.cat, torch.concat)
MATMUL = _any(_function(torch.matmul, torch.bmm, operator.matmul), _method("matmul", "bmm"))
HARDSWISH = _any(_module(nn.Hardswish), _function(F.hardswish))
SIGMOID = _any(_module(nn.Sigmoid, nn.Hardsigmoid), _function(torch.sigmoid, F.sigmoid, F.hardsigmoid))
MUL = _any(_function(operator.mul, torch.mul), _method("mul", "mul_"))
PRELU = _module(nn.PReLU)
GELU = _any(_module(nn.GELU), _function(F.gelu))
SILU = _any(_module(nn.SiLU), _function(F.silu))

# Longest first: a conv-bn-relu chain is reported once, not also as conv-bn.
PATTERNS: tuple[tuple[str, tuple[Matcher, ...]], ...] = (
    ("conv-bn-relu", (CONV, BN, RELU)),
    ("conv-bn-clamp", (CONV, BN, CLAMP)),
    ("conv-bn", (CONV, BN)),
    ("conv-relu", (CONV, RELU)),
    ("conv-clamp", (CONV, CLAMP)),
    ("linear-bn", (LINEAR, BN)),
    ("linear-relu", (LINEAR, RELU)),
    ("add-relu", (ADD, RELU)),
    ("sigmoid-mul", (SIGMOID, MUL)),
    ("add", (ADD,)),
    ("cat", (CAT,)),
    ("matmul", (MATMUL,)),
    ("hardswish", (HARDSWISH,)),
    ("prelu", (PRELU,)),
    ("gelu", (GELU,)),
    ("silu", (SILU,)),
)


@dataclass(frozen=True)
class FoundPattern:
    """One matched chain: the pattern's name and the graph nodes it covers, first to last."""

    pattern: str
    nodes: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.pattern}: {' -> '.join(self.nodes)}"


def _node_label(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def find_patterns(gm: fx.GraphModule) -> list[FoundPattern]:
    """Match `PATTERNS` along single-user chains, each node claimed by at most one pattern."""
    claimed: set[fx.Node] = set()
    found = []
    for node in gm.graph.nodes:
        if node in claimed:
            continue
        for name, matchers in PATTERNS:
            chain = _match_chain(gm, node, matchers, claimed)
            if chain is not None:
                claimed.update(chain)
                found.append(FoundPattern(name, tuple(_node_label(n) for n in chain)))
                break
    return found


def _match_chain(gm: fx.GraphModule, start: fx.Node, matchers: tuple[Matcher, ...],
                 claimed: set[fx.Node]) -> list[fx.Node] | None:
    chain = [start]
    if not matchers[0](gm, start):
        return None
    for matcher in matchers[1:]:
        last = chain[-1]
        if len(last.users) != 1:
            return None
        (nxt,) = last.users
        if nxt in claimed or last not in nxt.args or not matcher(gm, nxt):
            return None
        chain.append(nxt)
    return chain
