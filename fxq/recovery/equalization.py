"""Cross-layer equalization of activation channel ranges (after Nagel et al. 2019, data-free quantization).

Producers (conv/linear layers) write a set of tensors that only flow through adds and ReLUs into
consumers (conv/linear inputs): a residual stream, or simply one layer feeding the next. Scaling channel
i of every producer's output by 1/s_i and every consumer's input channel i by s_i leaves the float
function unchanged, because adds are linear and ReLU is positively homogeneous. A fused clamp's ceiling
becomes per channel (high / s_i), so ReLU6 stays exact in float too; the int8 kernel then clips at the
tensor's calibrated range, the ordinary clipping of static quantization. Such groups are the connected
components of a networkx graph over producer, add and ReLU nodes.

fxq quantizes weights per channel and activations per tensor, so the scaling is free on the producers'
rows and costs only on the consumers' columns. Depthwise consumers absorb s_i entirely and the
activations are fully equalized; with dense consumers, s_i balances each channel's activation range
against its weight column range relative to the row maximum (their geometric mean).

One constraint comes from the int8 kernels: a fused conv+ReLU kernel clips only at the tensor's
quantization range, never at a per-channel ceiling. A channel that reaches its clamp (ReLU6 saturating
on calibration data) must therefore have its rescaled ceiling at the top of the tensor's range, or the
int8 model lets through values the float model clips (on ImageNet MobileNetV2 that left the int8 model
at 21.7 dB from its own float simulation). Saturating channels share one scale, and the other channels
are kept below that common ceiling.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.backend.observers import contiguous_view
from fxq.calibration import Batch
from fxq.frontend.graph import get_module
from fxq.frontend.rewrite import unwrap
from fxq.recovery.layers import channel_axis_shape, is_depthwise, non_channel_dims

MIN_SCALE = 1e-3
# A channel whose calibrated maximum is this close to its clamp's ceiling counts as reaching it.
SATURATION = 0.999
_ADDS = (operator.add, torch.add)
_RELUS = (F.relu, torch.relu)
_MAX_POOLS = (F.max_pool1d, F.max_pool2d, F.max_pool3d)


@dataclass(frozen=True)
class EqualizedGroup:
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    channels: int
    range_spread_before: float  # max/min of per-channel activation range (live channels)
    range_spread_after: float


def _scalable_consumer(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or layer.groups == 1 or is_depthwise(layer)


def _is_stream_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Nodes a positive channel scaling passes through unchanged: add, ReLU and max pooling (a ResNet's
    stem reaches its first residual stream through a max-pool)."""
    if node.op == "call_function":
        return node.target in _ADDS or node.target in _RELUS or node.target in _MAX_POOLS
    if node.op == "call_method":
        return node.target in ("add", "relu")
    return isinstance(get_module(gm, node), (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d))


@dataclass
class _Group:
    producers: list[fx.Node]
    tensors: list[fx.Node]  # every node whose output carries the scaled channels
    consumers: list[fx.Node]


def find_groups(gm: fx.GraphModule) -> list[_Group]:
    """Producer/stream/consumer groups whose channels can be rescaled exactly, in graph order."""
    graph = nx.Graph()
    for node in gm.graph.nodes:
        if unwrap(get_module(gm, node))[0] is not None or _is_stream_op(gm, node):
            graph.add_node(node)
    for node in list(graph.nodes):
        if _is_stream_op(gm, node):
            for source in node.all_input_nodes:
                graph.add_edge(node, source)  # an add/ReLU joins its inputs' group
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    groups = []
    for component in nx.connected_components(graph):
        group = _validate(gm, component)
        if group is not None:
            groups.append(group)
    return sorted(groups, key=lambda g: order[g.producers[0]])


def _validate(gm: fx.GraphModule, component: set[fx.Node]) -> _Group | None:
    producers = [n for n in component if unwrap(get_module(gm, n))[0] is not None]
    if not producers:
        return None
    # an add's other input (the model input, a pool, a cat) joins the component as a plain node: its
    # channels cannot be rescaled, so neither can the group's
    if any(node not in producers and not _is_stream_op(gm, node) for node in component):
        return None
    for node in component:  # stream ops must be fed only from inside the group
        if _is_stream_op(gm, node) and any(src not in component for src in node.all_input_nodes):
            return None
    consumers = []
    for node in component:
        for user in node.users:
            if user in component and _is_stream_op(gm, user):
                continue
            layer = unwrap(get_module(gm, user))[0]
            if layer is None or not user.args or user.args[0] is not node or not _scalable_consumer(layer) \
                    or any(arg is node for arg in list(user.args[1:]) + list(user.kwargs.values())):
                return None
            consumers.append(user)
    if not consumers:
        return None
    layers = [unwrap(get_module(gm, n))[0] for n in producers + consumers]
    if len({isinstance(layer, nn.Linear) for layer in layers}) != 1:
        return None
    channels = {_channels_out(unwrap(get_module(gm, n))[0]) for n in producers} | \
        {_channels_in(unwrap(get_module(gm, n))[0]) for n in consumers}
    if len(channels) != 1:
        return None
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    return _Group(sorted(producers, key=order.get), sorted(component, key=order.get),
                  sorted(set(consumers), key=order.get))


def _channels_in(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _channels_out(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _channel_peaks(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Per-channel max |value| of a layer's output. max(amax, -amin) reads x twice but writes nothing (abs
    then amax took twice as long). Where the channels are the innermost dimension (a linear output, a
    channels-last conv output's NHWC view), the rows are reduced in groups first: torch reduced a
    [200704, 96] matrix over its rows in 11.5 ms, and as [784, 256, 96] over both in 4.0 ms."""
    if isinstance(layer, nn.Linear) or contiguous_view(x) is not x:
        if isinstance(layer, nn.Linear):
            rows = x.reshape(-1, x.shape[-1])
        else:
            rows = contiguous_view(x).reshape(-1, x.shape[1])
        group = next(size for size in (256, 64, 16, 1) if rows.shape[0] % size == 0)
        grouped = rows.view(-1, group, rows.shape[1])
        return torch.maximum(grouped.amax(1).amax(0), -grouped.amin(1).amin(0))
    dims = non_channel_dims(x, layer)
    return torch.maximum(x.amax(dim=dims), -x.amin(dim=dims))


def _channel_ranges(gm: fx.GraphModule, batches: Sequence[Batch], nodes: dict[fx.Node, nn.Module],
                    on_output: Callable[[int, Any], None] | None = None) -> dict[fx.Node, torch.Tensor]:
    """Per-channel max |value| of each listed node's output over the batches (one interpreter pass).

    `nodes` maps each node to a layer of its group, which says where the channels are (conv: dim 1,
    linear: the last dim). `on_output(index, output)` sees each batch's graph output."""
    ranges: dict[fx.Node, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node):
            result = super().run_node(node)
            if node in nodes and isinstance(result, torch.Tensor):
                peak = _channel_peaks(result.detach(), nodes[node])
                ranges[node] = torch.maximum(ranges[node], peak) if node in ranges else peak
            return result

    with torch.no_grad():
        recorder = Recorder(gm)
        for index, batch in enumerate(batches):
            output = recorder.run(*batch)
            if on_output is not None:
                on_output(index, output)
    return ranges


def _column_ranges(consumer: nn.Module) -> torch.Tensor:
    """Per-input-channel weight magnitude relative to each output row's maximum (row-scale invariant)."""
    weight = consumer.weight.detach()
    magnitude = weight.abs().flatten(2).amax(2) if weight.dim() > 2 else weight.abs()
    relative = magnitude / magnitude.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return relative.amax(dim=0)


def _scales(activation_range: torch.Tensor, consumers: list[nn.Module],
            ceiling: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel s_i (activation channel i is divided by it). `ceiling`: the producers' clamp per channel."""
    peak = activation_range.max().clamp_min(1e-12)
    relative_act = activation_range / peak
    dense = [layer for layer in consumers if not is_depthwise(layer)]
    if not dense:
        scales = relative_act  # every channel's range becomes the peak, so a reached clamp sits at the top
    else:
        columns = torch.stack([_column_ranges(layer) for layer in dense]).amax(0)
        scales = torch.sqrt(relative_act / columns.clamp_min(1e-12))
        if ceiling is not None:
            scales = _keep_reached_ceilings_on_top(scales, activation_range, ceiling)
        scales = scales / scales.max().clamp_min(1e-12)
    dead = activation_range <= 1e-8 * peak
    return torch.where(dead, torch.ones_like(scales), scales.clamp_min(MIN_SCALE))


def _keep_reached_ceilings_on_top(scales: torch.Tensor, activation_range: torch.Tensor,
                                  ceiling: torch.Tensor) -> torch.Tensor:
    """Give channels that reach their clamp one common scale and keep every other channel below it."""
    reached = torch.isfinite(ceiling) & (activation_range >= SATURATION * ceiling)
    if not reached.any():
        return scales
    common = torch.exp(torch.log(scales[reached].clamp_min(1e-12)).mean())
    scales = torch.where(reached, common, scales)
    top = (ceiling[reached] / common).min()  # the rescaled ceiling shared by the reached channels
    return torch.maximum(scales, activation_range / top)


def _ceiling(gm: fx.GraphModule, producers: list[fx.Node], channels: int) -> torch.Tensor | None:
    """Lowest clamp ceiling per channel over the group's producers (None when none is clamped)."""
    ceilings = []
    for node in producers:
        _, clamp = unwrap(get_module(gm, node))
        if clamp is not None and clamp.bounded:
            ceilings.append(clamp.high.detach().flatten().expand(channels))  # scalar or per channel
    return torch.stack(ceilings).amin(0) if ceilings else None


def _spread(values: torch.Tensor) -> float:
    alive = values[values > 1e-8 * values.max().clamp_min(1e-12)]
    return float(alive.max() / alive.min()) if alive.numel() else 1.0


@torch.no_grad()
def equalize(gm: fx.GraphModule, batches: Sequence[Batch],
             on_output: Callable[[int, Any], None] | None = None) -> list[EqualizedGroup]:
    """Equalize every rescalable group using calibration activation ranges; the float function is kept.

    When there is something to equalize, the graph runs on every batch, and `on_output(index, output)` sees
    its outputs (the pipeline checks them, rather than running the float model once more to do so)."""
    groups = find_groups(gm)
    if not groups:
        return []
    ranges = _channel_ranges(gm, batches, {node: unwrap(get_module(gm, group.producers[0]))[0]
                                           for group in groups for node in group.tensors}, on_output)
    done = []
    for group in groups:
        if any(node not in ranges for node in group.tensors):
            continue
        activation_range = torch.stack([ranges[node] for node in group.tensors]).amax(0)
        consumers = [unwrap(get_module(gm, node))[0] for node in group.consumers]
        scales = _scales(activation_range, consumers, _ceiling(gm, group.producers, activation_range.numel()))
        for node in group.producers:
            producer, clamp = unwrap(get_module(gm, node))
            producer.weight.div_(scales.view((-1,) + (1,) * (producer.weight.dim() - 1)))
            if producer.bias is not None:
                producer.bias.div_(scales)
            if clamp is not None and clamp.bounded:
                clamp.set_high(clamp.high / scales.view(channel_axis_shape(producer, scales.numel())))
        for consumer in consumers:
            if is_depthwise(consumer):
                consumer.weight.mul_(scales.view((-1,) + (1,) * (consumer.weight.dim() - 1)))
            else:
                consumer.weight.mul_(scales.view((1, -1) + (1,) * (consumer.weight.dim() - 2)))
        done.append(EqualizedGroup(tuple(str(n.target) for n in group.producers),
                                   tuple(str(n.target) for n in group.consumers), scales.numel(),
                                   _spread(activation_range), _spread(activation_range / scales)))
    return done
