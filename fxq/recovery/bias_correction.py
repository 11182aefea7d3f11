"""Empirical bias correction (Nagel et al. 2019; Finkelstein et al. 2019).

Rounding weights to int8 shifts each output channel's mean: E[(W_q - W) x] is not zero when inputs are
not zero-mean (after ReLU they never are). Measured on the calibration inputs of every conv/linear, that
shift is subtracted from the layer's bias before quantization, so the int8 layer is unbiased on average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.backend.engine import fake_quantize_weight
from fxq.calibration import Batch
from fxq.recovery.layers import non_channel_dims, run_with_hooks, weighted_nodes


@dataclass(frozen=True)
class BiasCorrection:
    layer: str
    mean_shift: float  # mean |E[(W_q - W) x]| over output channels, removed from the bias


def _weight_error_output(layer: nn.Module, x: torch.Tensor, weight_error: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight_error)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight_error.dim() - 2]
    padding = layer.padding if layer.padding_mode == "zeros" else 0
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
    return conv(x, weight_error, None, layer.stride, padding, layer.dilation, layer.groups)


@torch.no_grad()
def correct_biases(gm: fx.GraphModule, batches: Sequence[Batch], per_channel: bool = True,
                   skip: Iterable[str | type] = (),
                   quantized_weights: dict[str, torch.Tensor] | None = None) -> list[BiasCorrection]:
    """Subtract the calibration-mean output shift caused by weight rounding from each layer's bias.

    `quantized_weights` gives the int8 weights (as on-grid floats) where they are not simply the nearest
    rounding, e.g. after optimized rounding.
    """
    layers = {str(node.target): layer for node, layer, _ in weighted_nodes(gm, skip)}
    quantized_weights = quantized_weights or {}
    errors = {name: quantized_weights.get(name, fake_quantize_weight(layer.weight.detach(), per_channel))
              - layer.weight.detach() for name, layer in layers.items()}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, x: torch.Tensor, _output: torch.Tensor) -> None:
        layer = layers[name]
        shift = _weight_error_output(layer, x, errors[name])
        dims = non_channel_dims(shift, layer)
        sums[name] = sums.get(name, 0) + shift.sum(dim=dims)
        counts[name] = counts.get(name, 0) + math.prod(shift.shape[d] for d in dims)

    run_with_hooks(gm, batches, {name: gm.get_submodule(name) for name in layers}, record)
    corrections = []
    for name, layer in layers.items():
        if name not in sums:
            continue
        mean_shift = sums[name] / counts[name]
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(mean_shift))
        layer.bias.sub_(mean_shift)
        corrections.append(BiasCorrection(name, float(mean_shift.abs().mean())))
    return corrections
