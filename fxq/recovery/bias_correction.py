"""Empirical bias correction on the float simulation of the int8 model (after Nagel et al. 2019 and
Finkelstein et al. 2019), layer by layer with quantized upstream inputs.

Quantization shifts each output channel's mean: rounded weights do (E[(W_q - W) x] is not zero when
inputs are not zero-mean, and after ReLU they never are), and so does every upstream activation's
rounding and clipping, compounding through the network. Correcting only the weight part, on float
inputs, leaves the second. Here the calibration images run through torch.ao's reference model (the
float simulation of the int8 model: quantize/dequantize pairs and on-grid weights) next to the float
model, one layer at a time over all images: each layer's bias absorbs the mean difference between its
simulated and float outputs, measured after every earlier layer was corrected, so it also removes the
shift that earlier layers' quantization left in its inputs.

Only positions where the float output lies inside its fused clamp's linear range count. An error on
a value the clamp cuts off is cut off with it; averaging those in as well made MobileNetV2's float
simulation worse (13.2 dB against 15.8 dB uncorrected), while the masked mean gave 17.6 dB.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import fx, nn

from fxq.calibration import Batch
from fxq.config import key_covers
from fxq.frontend.graph import get_module
from fxq.recovery.layers import channel_axis_shape, non_channel_dims, unwrap

# Samples the layer-by-layer pass holds at once (every image's activations at the current layer).
MAX_SAMPLES = 64


@dataclass(frozen=True)
class BiasCorrection:
    layer: str
    mean_shift: float  # mean |shift| over output channels, removed from the bias


def _last_uses(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the values no later node reads (so the pass can free them)."""
    seen: set[fx.Node] = set()
    last: dict[fx.Node, list[fx.Node]] = {node: [] for node in gm.graph.nodes}
    for node in reversed(gm.graph.nodes):
        for source in node.all_input_nodes:
            if source not in seen:
                seen.add(source)
                last[node].append(source)
    return last


def _layer_major(gm: fx.GraphModule, batches: Sequence[Batch]) -> Iterator[tuple[fx.Node, list[torch.Tensor]]]:
    """Run `gm` node by node over all batches at once, pausing before each weighted layer.

    Yields (node, the layer's input for each batch); the node runs when the caller resumes, so a
    caller may change the layer in between and every later node sees the change on every batch.
    """
    runners = []
    for batch in batches:
        runner = fx.Interpreter(gm)
        runner.args_iter = iter(batch)
        runner.env = {}
        runners.append(runner)
    last_uses = _last_uses(gm)
    for node in gm.graph.nodes:
        if unwrap(get_module(gm, node))[0] is not None:
            yield node, [runner.env[node.args[0]] for runner in runners]
        for runner in runners:
            runner.env[node] = runner.run_node(node)
            for dead in last_uses[node]:
                del runner.env[dead]


def _first_samples(batches: Sequence[Batch], limit: int) -> list[Batch]:
    """Leading batches holding at most `limit` samples (at least one batch)."""
    chosen, samples = [], 0
    for batch in batches:
        size = batch[0].shape[0] if batch and isinstance(batch[0], torch.Tensor) and batch[0].dim() else 1
        if chosen and samples + size > limit:
            break
        chosen.append(batch)
        samples += size
    return chosen


def _linear_region(output: torch.Tensor, layer: nn.Module, clamp: nn.Module | None) -> torch.Tensor:
    """Where the fused clamp passes the float output through unchanged."""
    if clamp is None:
        return torch.ones_like(output, dtype=torch.bool)
    inside = output > clamp.low
    if clamp.bounded:
        high = clamp.high
        if high.numel() > 1:
            high = high.reshape(channel_axis_shape(layer, high.numel()))
        inside &= output < high
    return inside


@torch.no_grad()
def correct_biases(reference: fx.GraphModule, float_gm: fx.GraphModule, batches: Sequence[Batch],
                   skip: Iterable[str | type] = ()) -> list[BiasCorrection]:
    """Correct the biases of `reference`'s simulated layers in place, layer by layer; return what moved.

    `float_gm` is the float model the simulation was prepared from (same module names); layers that
    `skip` keeps in float, and layers called more than once, are left alone.
    """
    skip = tuple(skip)
    batches = _first_samples(batches, MAX_SAMPLES)
    calls = Counter(str(node.target) for node in reference.graph.nodes if node.op == "call_module")
    float_inputs = _layer_major(float_gm, batches)
    corrections = []
    for node, simulated_inputs in _layer_major(reference, batches):
        name = str(node.target)
        for float_node, inputs in float_inputs:  # the float model's input to the same layer
            if str(float_node.target) == name:
                break
        else:
            break  # the float graph has no such layer: nothing later can be paired either
        layer, _ = unwrap(get_module(reference, node))
        float_layer, clamp = unwrap(get_module(float_gm, float_node))
        if calls[name] > 1 or key_covers(skip, name, float_layer) or layer.bias is None:
            continue
        shift_sum, counted = 0, 0
        for simulated_x, float_x in zip(simulated_inputs, inputs):
            float_out = float_layer(float_x)
            inside = _linear_region(float_out, float_layer, clamp)
            dims = non_channel_dims(float_out, float_layer)
            shift_sum = shift_sum + ((layer(simulated_x) - float_out) * inside).sum(dim=dims)
            counted = counted + inside.sum(dim=dims)
        shift = shift_sum / torch.as_tensor(counted).clamp_min(1)
        layer.bias.sub_(shift)
        corrections.append(BiasCorrection(name, float(shift.abs().mean())))
    return corrections
