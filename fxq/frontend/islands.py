"""Float islands: ops where int8 costs more time than it saves, found before the qconfig mapping is built.

torch.ao's FX flow runs every op it knows in int8 and puts a quantize before and a dequantize after
wherever an int8 op meets a float one. Around ops without an int8 kernel (SiLU, GELU, ...) that makes
int8 pay twice: an int8 add, cat or view between two float ops costs a quantize and a dequantize for
nothing, and some int8 kernels are slower than float outright (a squeeze-excitation multiply, a conv on a
1x1 map, and x86's depthwise convs with more than 100 channels that are dilated or not a multiple of 8,
which fall to a reference loop 20-50x slower than float). `find_float_islands` decides, for the whole
graph at once, which ops run in int8 so that the estimated latency is smallest, and `keep_islands_float`
makes the rest float; the summary lists every such island with both estimates.

Cost model. Every op costs `overhead + rate * units` microseconds in float and in int8, where units are
multiply-accumulates for conv / linear / matmul and output elements otherwise (input elements for global
pooling). Where a float op's output feeds an int8 op there is one quantize of that tensor, where an int8
op's output feeds a float op one dequantize, each also `overhead + rate * elements`. Ops torch.ao cannot
run in int8 (and graph inputs and outputs) are float by force; views and shape ops cost nothing either
way. The constants (`COSTS`) were measured on the reference machine (AMD EPYC Zen 4, 2 threads, engine
x86, torch 2.14.1) by bench/experiments/island_costs.py and rounded; they are fixed, not measured per run, so the
same model always gets the same plan. Only their ratios matter for the decision. A conv or linear layer
pays an extra WEIGHTED_FLOAT_PENALTY_US for going float, so only clear losses leave one float.

Choosing int8 or float per op to minimise total cost is a binary labelling with unary costs (each op's
float or int8 time) and pairwise costs (the conversion on an edge whose two ends differ), which a
minimum s-t cut solves exactly (networkx; under a second for ViT-B/16's graph). A tensor read by several ops is converted once, not once per reader: two
auxiliary vertices per tensor charge the quantize (or the dequantize) once if any reader needs it.
"""

from __future__ import annotations

import math
import operator
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.config import key_covers
from fxq.frontend.graph import get_module, outline


@dataclass(frozen=True)
class Cost:
    """Latency of one op class: float_us + float_ns * units / 1000 in float, likewise in int8."""

    float_us: float
    float_ns: float
    int8_us: float
    int8_ns: float

    def float_time(self, units: float) -> float:
        return self.float_us + self.float_ns * units / 1000.0

    def int8_time(self, units: float) -> float:
        return self.int8_us + self.int8_ns * units / 1000.0


# Measured by bench/experiments/island_costs.py (see the module docstring), rounded.
COSTS: dict[str, Cost] = {
    "add": Cost(2, 0.25, 5, 0.30),
    "mul": Cost(4, 0.25, 7, 0.33),
    "mul_broadcast": Cost(4, 0.20, 32, 0.18),  # (N, C, H, W) * (N, C, 1, 1): int8 has no broadcast fast path
    "cat": Cost(6, 0.16, 25, 0.03),
    "hardswish": Cost(4, 0.24, 10, 0.45),
    "hardsigmoid": Cost(4, 0.19, 5, 0.34),
    "sigmoid": Cost(6, 0.55, 8, 1.30),
    "relu": Cost(4, 0.16, 5, 0.08),
    "max_pool": Cost(0, 60.0, 80, 0.60),  # float max_pool2d (with indices) is slow on NCHW here
    "avg_pool": Cost(0, 20.0, 30, 0.85),
    "global_pool": Cost(7, 0.11, 3, 0.09),  # units: input elements
    "interpolate": Cost(10, 3.0, 50, 2.0),
    "layer_norm": Cost(13, 1.20, 24, 1.00),
    "softmax": Cost(12, 1.10, 38, 2.10),
    "conv": Cost(20, 0.035, 40, 0.011),  # units: multiply-accumulates
    "conv1x1": Cost(20, 0.035, 50, 0.008),
    "conv_tiny": Cost(15, 0.11, 38, 0.05),  # a conv on a 1x1 map (squeeze-excitation): weight-bound
    "conv_grouped": Cost(20, 0.05, 40, 0.013),
    "conv_depthwise": Cost(100, 0.15, 90, 0.07),
    # x86 sends depthwise convs with more than 100 groups to fbgemm, whose fast depthwise kernels need
    # channels in multiples of 8 and no dilation; otherwise a reference loop runs, 20-50x slower than float
    # (ShuffleNetV2's 116-channel stage, the dilated 5x5 convs of segmentation MobileNetV3 backbones)
    "conv_depthwise_fbgemm_slow": Cost(100, 0.9, 300, 20.0),
    "linear": Cost(20, 0.03, 38, 0.006),
    "linear_tiny": Cost(15, 0.11, 38, 0.05),  # one token (a classifier): weight-bound like conv_tiny
    "matmul": Cost(15, 0.03, 45, 0.034),
    "view": Cost(0, 0.0, 0, 0.0),
}
QUANTIZE = Cost(10, 0.25, 0, 0)  # float -> int8, per tensor element
DEQUANTIZE = Cost(10, 0.09, 0, 0)  # int8 -> float
# A conv or linear layer is left float only when that saves more than this (us per call): int8 weights are
# 4x smaller, users expect int8 layers, and the table is only good to tens of microseconds on small
# layers. Pathological int8 kernels (x86's dilated depthwise conv) lose by milliseconds and still go float.
WEIGHTED_FLOAT_PENALTY_US = 50.0
WEIGHTED = frozenset({"conv", "conv1x1", "conv_tiny", "conv_grouped", "conv_depthwise",
                      "conv_depthwise_fbgemm_slow", "linear", "linear_tiny"})

_VIEW_METHODS = frozenset({
    "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous", "detach",
    "expand", "expand_as", "view_as", "reshape_as", "chunk", "split", "unbind", "narrow", "repeat",
    "repeat_interleave", "t", "unflatten", "movedim", "size", "dim"})
_VIEW_FUNCTIONS = frozenset({
    torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.narrow,
    torch.chunk, torch.split, torch.unbind, torch.repeat_interleave, operator.getitem, F.dropout})
_MODULE_CLASSES: tuple[tuple[tuple[type, ...], str], ...] = (
    ((nn.Hardswish,), "hardswish"), ((nn.Hardsigmoid,), "hardsigmoid"), ((nn.Sigmoid, nn.Tanh), "sigmoid"),
    ((nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.ELU), "relu"),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), "max_pool"), ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), "avg_pool"),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), "global_pool"),
    ((nn.Upsample,), "interpolate"), ((nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                                       nn.InstanceNorm3d), "layer_norm"),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), "mul"), ((nn.Softmax,), "softmax"),
    ((nn.Identity, nn.Dropout, nn.Flatten, nn.PixelShuffle, nn.PixelUnshuffle), "view"),
)
_FUNCTION_CLASSES: dict[Any, str] = {
    operator.add: "add", torch.add: "add", operator.mul: "mul", torch.mul: "mul", torch.cat: "cat",
    torch.stack: "cat", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", torch.sigmoid: "sigmoid",
    torch.tanh: "sigmoid", F.relu: "relu", F.relu6: "relu", F.hardtanh: "relu", torch.clamp: "relu",
    F.leaky_relu: "relu", F.elu: "relu", F.max_pool1d: "max_pool", F.max_pool2d: "max_pool",
    F.max_pool3d: "max_pool", F.avg_pool2d: "avg_pool", torch._C._nn.avg_pool2d: "avg_pool",
    F.adaptive_avg_pool2d: "global_pool", torch.mean: "global_pool", F.interpolate: "interpolate",
    F.layer_norm: "layer_norm", F.group_norm: "layer_norm", F.instance_norm: "layer_norm",
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul", F.linear: "linear",
    torch.conv2d: "conv", F.conv2d: "conv",
}
_METHOD_CLASSES = {"add": "add", "mul": "mul", "relu": "relu", "clamp": "relu", "sigmoid": "sigmoid",
                   "tanh": "sigmoid", "mean": "global_pool", "hardsigmoid": "hardsigmoid", "matmul": "matmul"}


@dataclass(frozen=True)
class FloatIsland:
    """Ops the cost model keeps in float: the graph nodes, their op kinds, and the estimated times (us)."""

    nodes: tuple[str, ...]
    ops: tuple[str, ...]
    int8_us: float  # estimated time of these ops in int8, with the conversions int8 would add around them
    float_us: float  # estimated time in float, with the conversions float needs

    @property
    def reason(self) -> str:
        return (f"float island: int8 would cost ~{self.int8_us:.0f} us with its quantize/dequantize, float "
                f"~{self.float_us:.0f} us")


@dataclass
class IslandPlan:
    """What the cost model decided: ops kept float, and the estimated model time either way (us)."""

    islands: list[FloatIsland]
    float_nodes: list[str]  # every quantizable node labelled float, by node name
    float_modules: list[str]  # call_module targets all of whose calls are labelled float
    all_int8_us: float  # every quantizable op in int8 (torch.ao's default)
    planned_us: float  # with the islands in float
    float_us: float  # the whole model in float
    annotations: dict[str, Any] = field(default_factory=dict, repr=False)  # types of non-tensor values


def _tensor_elements(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_elements(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_elements(v) for v in value.values())
    return 0


class _Recorder(fx.Interpreter):
    """Runs the graph once, keeping each node's output element count and a light description of it."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.elements: dict[fx.Node, int] = {}
        self.is_tensor: dict[fx.Node, bool] = {}
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.annotations: dict[str, Any] = {}  # node name -> Python type of a non-tensor value

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.elements[n] = _tensor_elements(value)
        self.is_tensor[n] = isinstance(value, torch.Tensor)
        if isinstance(value, torch.Tensor):
            self.shapes[n] = tuple(value.shape)
        else:
            self.annotations[n.name] = _annotation(value)
        return value


def _annotation(value: Any) -> Any:
    """The TorchScript-readable type of a value, for outlined graphs' arguments."""
    if isinstance(value, (bool, int, float, str)):
        return type(value)
    if isinstance(value, (list, tuple)) and value:
        kinds = {_annotation(v) for v in value}
        if len(kinds) == 1:
            return typing.List[kinds.pop()]
    if isinstance(value, torch.Size):
        return typing.List[int]
    return None


def _weighted(module: nn.Module) -> nn.Module | None:
    """The conv / linear inside a module (itself, or the first module of a fused container)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return module
    if isinstance(module, nn.Sequential) and len(module) and isinstance(module[0], (nn.Conv1d, nn.Conv2d,
                                                                                     nn.Conv3d, nn.Linear)):
        return module[0]
    return None


def _conv_class(conv: nn.Module, output_shape: tuple[int, ...], engine: str) -> str:
    spatial = math.prod(output_shape[2:]) if len(output_shape) > 2 else 1
    if spatial == 1:
        return "conv_tiny"
    if conv.groups > 1 and conv.groups == conv.in_channels:
        if engine in ("x86", "fbgemm") and conv.groups > 100 and (max(conv.dilation) > 1 or conv.groups % 8):
            return "conv_depthwise_fbgemm_slow"
        return "conv_depthwise"
    if conv.groups > 1:
        return "conv_grouped"
    return "conv1x1" if math.prod(conv.kernel_size) == 1 else "conv"


def op_cost(gm: fx.GraphModule, node: fx.Node, recorder: _Recorder, engine: str) -> tuple[str, float]:
    """(op class, units) of a node that torch.ao would run in int8."""
    elements = recorder.elements.get(node, 0)
    module = get_module(gm, node)
    if module is not None:
        layer = _weighted(module)
        if isinstance(layer, nn.Linear):
            tokens = elements // max(layer.out_features, 1)
            return "linear_tiny" if tokens <= 1 else "linear", elements * layer.in_features
        if layer is not None:
            macs = elements * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
            return _conv_class(layer, recorder.shapes.get(node, ()), engine), macs
        for types, kind in _MODULE_CLASSES:
            if isinstance(module, types):
                return kind, _input_elements(node, recorder) if kind == "global_pool" else elements
        return "add", elements
    if node.op == "call_method":
        if node.target in _VIEW_METHODS:
            return "view", 0
        kind = _METHOD_CLASSES.get(str(node.target), "add")
    elif node.target in _VIEW_FUNCTIONS:
        return "view", 0
    else:
        kind = _FUNCTION_CLASSES.get(node.target, "add")
    if kind in ("mul", "add") and _broadcasts(node, recorder):
        kind = "mul_broadcast"
    if kind == "global_pool":
        return kind, _input_elements(node, recorder)
    if kind == "linear":
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        shape = recorder.shapes.get(weight, (1, 1)) if isinstance(weight, fx.Node) else (1, 1)
        return "linear_tiny" if elements <= shape[0] else kind, elements * shape[-1]
    if kind == "matmul":
        first = node.args[0] if node.args else None
        inner = recorder.shapes.get(first, (1,))[-1] if isinstance(first, fx.Node) else 1
        return kind, elements * inner
    if kind == "conv":
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        shape = recorder.shapes.get(weight, (1, 1)) if isinstance(weight, fx.Node) else (1, 1)
        return kind, elements * math.prod(shape[1:])
    return kind, elements


def _input_elements(node: fx.Node, recorder: _Recorder) -> int:
    first = node.args[0] if node.args else None
    return recorder.elements.get(first, 0) if isinstance(first, fx.Node) else 0


def _broadcasts(node: fx.Node, recorder: _Recorder) -> bool:
    shapes = [recorder.shapes.get(arg) for arg in node.args if isinstance(arg, fx.Node)]
    return len(shapes) == 2 and None not in shapes and shapes[0] != shapes[1]


_SOURCE, _SINK = "int8", "float"


def find_float_islands(gm: fx.GraphModule, example_inputs: tuple[Any, ...], quantizable: Callable[[fx.GraphModule, fx.Node], bool],
                       engine: str, float_modules: Iterable[str] = (),
                       measured_us: Mapping[str, tuple[float, float]] | None = None) -> IslandPlan:
    """Label every op of `gm` int8 or float for the smallest estimated latency (see the module docstring).

    `quantizable(gm, node)` says whether torch.ao would run a node in int8; `float_modules` are module
    names that stay float anyway (untraceable leaves, keep_float). `measured_us` gives (float, int8)
    times measured on this machine for some call_module targets; they replace the table's estimates.
    """
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(*example_inputs)
    fixed_float = tuple(float_modules)

    def forced_float(node: fx.Node) -> bool:
        if node.op == "call_module" and key_covers(fixed_float, str(node.target)):
            return True
        return not quantizable(gm, node)

    tensors = [n for n in gm.graph.nodes if n.op in ("placeholder", "call_module", "call_function", "call_method")
               and recorder.elements.get(n, 0) > 0]
    in_graph = set(tensors)
    costs: dict[fx.Node, tuple[str, float, float]] = {}  # node -> (class, float us, int8 us)
    graph = nx.DiGraph()
    graph.add_nodes_from([_SOURCE, _SINK])
    for node in tensors:
        if node.op == "placeholder" or forced_float(node):
            graph.add_edge(node, _SINK)  # no capacity: infinite, the node is float
            continue
        kind, units = op_cost(gm, node, recorder, engine)
        cost = COSTS[kind]
        costs[node] = (kind, cost.float_time(units), cost.int8_time(units))
        if measured_us and node.op == "call_module" and str(node.target) in measured_us:
            costs[node] = (kind, *measured_us[str(node.target)])
        penalty = WEIGHTED_FLOAT_PENALTY_US if kind in WEIGHTED else 0.0
        graph.add_edge(_SOURCE, node, capacity=costs[node][1] + penalty)  # cut when the node is float
        graph.add_edge(node, _SINK, capacity=costs[node][2])  # cut when the node is int8
    for node in tensors:
        readers = [user for user in node.users if user in in_graph]
        readers_float = any(user.op == "output" for user in node.users)
        if not readers and not readers_float:
            continue
        elements = recorder.elements[node]
        quantize, dequantize = QUANTIZE.float_time(elements), DEQUANTIZE.float_time(elements)
        # quantize once if the producer is float and any reader is int8
        needs_q = ("q", node)
        graph.add_edge(needs_q, node, capacity=quantize)
        for reader in readers:
            graph.add_edge(reader, needs_q)
        # dequantize once if the producer is int8 and any reader is float (the graph output always is)
        needs_dq = ("dq", node)
        graph.add_edge(node, needs_dq, capacity=dequantize)
        for reader in readers:
            graph.add_edge(needs_dq, reader)
        if readers_float:
            graph.add_edge(needs_dq, _SINK)
    _, (int8_side, _) = nx.minimum_cut(graph, _SOURCE, _SINK)
    int8_nodes = {n for n in int8_side if isinstance(n, fx.Node)}
    estimate = _Estimate(tensors, costs, recorder)
    float_nodes = [n for n in costs if n not in int8_nodes]
    return IslandPlan(
        islands=_group_islands(gm, float_nodes, int8_nodes, estimate),
        float_nodes=[n.name for n in float_nodes],
        float_modules=_float_call_modules(gm, float_nodes, costs),
        all_int8_us=round(estimate.total(set(costs)), 1),
        planned_us=round(estimate.total(int8_nodes), 1),
        float_us=round(estimate.total(set()), 1),
        annotations=recorder.annotations)


@dataclass
class _Estimate:
    tensors: list[fx.Node]
    costs: dict[fx.Node, tuple[str, float, float]]  # node -> (op class, float us, int8 us)
    recorder: _Recorder

    def total(self, int8_nodes: set[fx.Node]) -> float:
        """Estimated time (us) of the quantizable ops and all conversions when `int8_nodes` run in int8."""
        total = sum(c[2] if n in int8_nodes else c[1] for n, c in self.costs.items())
        in_graph = set(self.tensors)
        for node in self.tensors:
            readers = [u for u in node.users if u in in_graph]
            elements = self.recorder.elements[node]
            if node in int8_nodes and (any(r not in int8_nodes for r in readers)
                                       or any(u.op == "output" for u in node.users)):
                total += DEQUANTIZE.float_time(elements)
            if node not in int8_nodes and any(r in int8_nodes for r in readers):
                total += QUANTIZE.float_time(elements)
        return total


def _float_call_modules(gm: fx.GraphModule, float_nodes: list[fx.Node],
                        costs: dict[fx.Node, tuple[str, float, float]]) -> list[str]:
    """Modules to keep float: every call of them was labelled float (a shared module called elsewhere in
    int8 stays int8 everywhere)."""
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    floating = set(float_nodes)
    return sorted({str(n.target) for n in float_nodes if n.op == "call_module"
                   and all(c in floating for c in calls[str(n.target)])})


def _group_islands(gm: fx.GraphModule, float_nodes: list[fx.Node], int8_nodes: set[fx.Node],
                   estimate: _Estimate) -> list[FloatIsland]:
    """Connected groups of float-labelled quantizable ops, each with its int8 and float estimates."""
    floating = set(float_nodes)
    undirected = nx.Graph()
    undirected.add_nodes_from(float_nodes)
    for node in float_nodes:
        for user in node.users:
            if user in floating:
                undirected.add_edge(node, user)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    planned = estimate.total(int8_nodes)
    islands = []
    for component in sorted(nx.connected_components(undirected), key=lambda c: min(order[n] for n in c)):
        members = sorted(component, key=order.__getitem__)
        kinds = tuple(estimate.costs[n][0] for n in members)
        if all(kind == "view" for kind in kinds):
            continue  # shape ops only: free either way, not worth listing
        own_float = sum(estimate.costs[n][1] for n in members)
        extra = estimate.total(int8_nodes | set(members)) - planned
        islands.append(FloatIsland(tuple(str(n.target) if n.op == "call_module" else n.name for n in members),
                                   kinds, round(own_float + extra, 1), round(own_float, 1)))
    return islands


def keep_islands_float(gm: fx.GraphModule, plan: IslandPlan) -> list[str]:
    """Make the plan's float ops float in torch.ao's eyes; returns the module names to give a None qconfig.

    Modules are named as they are. Function and method calls cannot be addressed by name in a qconfig
    mapping, so each run of them is moved into a small GraphModule (`outline`), which is then named.
    """
    names = {node.name: node for node in gm.graph.nodes}
    calls = [names[n] for n in plan.float_nodes if n in names and names[n].op in ("call_function", "call_method")]
    annotations = {node: plan.annotations[node.name] for node in gm.graph.nodes if node.name in plan.annotations}
    outlined = outline(gm, calls, prefix="fxq_float_ops", annotations=annotations)
    return sorted(set(plan.float_modules) | set(outlined))
