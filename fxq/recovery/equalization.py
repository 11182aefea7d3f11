"""Cross-layer equalization of activation channel ranges (after Nagel et al. 2019, data-free quantization).

For a producer layer A whose output feeds only a consumer B (through nothing, a ReLU or a zero-floored
clamp), scaling A's output channel i by 1/s_i and B's input channel i by s_i leaves the float function
unchanged, because these activations are positively homogeneous. A clamp's ceiling becomes per channel
(high / s_i) so even ReLU6 stays exact in float; the int8 kernel then clips at the tensor's calibrated
range, which is the ordinary clipping of static quantization.

The choice of s differs from the paper because fxq quantizes weights per channel and activations per
tensor: A's rows are free to scale (per-channel weights absorb it), so the cost is only on B's columns.
A depthwise B absorbs s_i entirely, so the activation is fully equalized; for a dense B, s_i balances the
activation range against B's column range relative to its per-row maximum (the geometric mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import fx, nn

from fxq.calibration import Batch
from fxq.frontend.graph import get_module
from fxq.recovery.layers import channel_axis_shape, run_with_hooks, unwrap

MIN_SCALE = 1e-3


@dataclass(frozen=True)
class EqualizedPair:
    producer: str
    consumer: str
    channels: int
    range_spread_before: float  # max/min of per-channel activation range
    range_spread_after: float


def _is_depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and layer.groups > 1 \
        and layer.groups == layer.in_channels and layer.weight.shape[1] == 1


def _input_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _output_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def find_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(producer, consumer) module names, in graph order, where the producer's only user is the consumer."""
    pairs = []
    for node in gm.graph.nodes:
        producer, _ = unwrap(get_module(gm, node))
        if producer is None or len(node.users) != 1:
            continue
        (user,) = node.users
        consumer, _ = unwrap(get_module(gm, user))
        if consumer is None or not user.args or user.args[0] is not node:
            continue
        if isinstance(producer, nn.Linear) != isinstance(consumer, nn.Linear):
            continue
        if _output_channels(producer) != _input_channels(consumer):
            continue
        if not isinstance(consumer, nn.Linear) and consumer.groups != 1 and not _is_depthwise(consumer):
            continue
        pairs.append((str(node.target), str(user.target)))
    return pairs


def _channel_ranges(gm: fx.GraphModule, batches: Sequence[Batch], names: set[str]) -> dict[str, torch.Tensor]:
    """Per-channel max |activation| at the output of each named module over the batches."""
    ranges: dict[str, torch.Tensor] = {}

    def record(name: str, _input: torch.Tensor, output: torch.Tensor) -> None:
        dims = [d for d in range(output.dim()) if d != (1 if output.dim() > 2 else output.dim() - 1)]
        peak = output.detach().abs().amax(dim=dims)
        ranges[name] = torch.maximum(ranges[name], peak) if name in ranges else peak

    run_with_hooks(gm, batches, {name: gm.get_submodule(name) for name in names}, record)
    return ranges


def _column_ranges(consumer: nn.Module) -> torch.Tensor:
    """Per-input-channel weight magnitude relative to each output row's maximum (row-scale invariant)."""
    weight = consumer.weight.detach()
    if _is_depthwise(consumer):
        return torch.ones(consumer.in_channels)
    magnitude = weight.abs().flatten(2).amax(2) if weight.dim() > 2 else weight.abs()
    relative = magnitude / magnitude.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return relative.amax(dim=0)


def _scales(activation_range: torch.Tensor, consumer: nn.Module) -> torch.Tensor:
    peak = activation_range.max().clamp_min(1e-12)
    relative_act = activation_range / peak
    if _is_depthwise(consumer):
        scales = relative_act
    else:
        scales = torch.sqrt(relative_act / _column_ranges(consumer).clamp_min(1e-12))
        scales = scales / scales.max().clamp_min(1e-12)
    dead = activation_range <= 1e-8 * peak
    return torch.where(dead, torch.ones_like(scales), scales.clamp_min(MIN_SCALE))


def _spread(values: torch.Tensor) -> float:
    alive = values[values > 1e-8 * values.max().clamp_min(1e-12)]
    return float(alive.max() / alive.min()) if alive.numel() else 1.0


@torch.no_grad()
def equalize_pairs(gm: fx.GraphModule, batches: Sequence[Batch]) -> list[EqualizedPair]:
    """Equalize every producer->consumer pair in graph order, using calibration activation ranges."""
    pairs = find_pairs(gm)
    if not pairs:
        return []
    ranges = _channel_ranges(gm, batches, {producer for producer, _ in pairs})
    done = []
    for producer_name, consumer_name in pairs:
        producer, clamp = unwrap(gm.get_submodule(producer_name))
        consumer, _ = unwrap(gm.get_submodule(consumer_name))
        activation_range = ranges[producer_name]
        scales = _scales(activation_range, consumer)
        rows = (-1,) + (1,) * (producer.weight.dim() - 1)
        producer.weight.div_(scales.view(rows))
        if producer.bias is not None:
            producer.bias.div_(scales)
        if _is_depthwise(consumer):
            consumer.weight.mul_(scales.view((-1,) + (1,) * (consumer.weight.dim() - 1)))
        else:
            consumer.weight.mul_(scales.view((1, -1) + (1,) * (consumer.weight.dim() - 2)))
        if clamp is not None and clamp.bounded:
            clamp.set_high(clamp.high / scales.view(channel_axis_shape(producer, scales.numel())))
        done.append(EqualizedPair(producer_name, consumer_name, scales.numel(),
                                  _spread(activation_range), _spread(activation_range / scales)))
    return done
