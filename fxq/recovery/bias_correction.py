"""Empirical bias correction on the float simulation of the int8 model (after Nagel et al. 2019 and
Finkelstein et al. 2019), layer by layer with quantized upstream inputs.

Quantization shifts each output channel's mean: rounded weights do (E[(W_q - W) x] is not zero when
inputs are not zero-mean, and after ReLU they never are), and so does every upstream activation's
rounding and clipping, compounding through the network. Correcting only the weight part, on float
inputs, leaves the second. Here each layer of the simulation (see layerwise.py) absorbs into its bias
the mean difference between its simulated and float outputs, measured after every earlier layer was
corrected, so it also removes the shift that earlier layers' quantization left in its inputs.

Only positions where the float output lies inside its fused clamp's linear range count. An error on
a value the clamp cuts off is cut off with it; averaging those in as well made MobileNetV2's float
simulation worse (13.2 dB against 15.8 dB uncorrected), while the masked mean gave 17.6 dB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxq.recovery.layers import non_channel_dims
from fxq.recovery.layerwise import PairedLayer


@dataclass(frozen=True)
class BiasCorrection:
    layer: str
    mean_shift: float  # mean |shift| over output channels, removed from the bias


@torch.no_grad()
def correct_bias(pair: PairedLayer) -> BiasCorrection | None:
    """Remove from the simulated layer's bias its mean output shift against the float layer."""
    layer = pair.simulated
    if layer.bias is None:
        return None
    shift_sum, counted = 0, 0
    for simulated_x, float_x in zip(pair.simulated_inputs, pair.float_inputs):
        float_out = pair.float_layer(float_x)
        inside = pair.linear_region(float_out)
        dims = non_channel_dims(float_out, pair.float_layer)
        shift_sum = shift_sum + ((layer(simulated_x) - float_out) * inside).sum(dim=dims)
        counted = counted + inside.sum(dim=dims)
    shift = shift_sum / torch.as_tensor(counted).clamp_min(1)
    layer.bias.sub_(shift)
    return BiasCorrection(pair.name, float(shift.abs().mean()))
