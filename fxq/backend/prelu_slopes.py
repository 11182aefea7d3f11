"""The weight grid of an int8 PReLU: its slopes on a grid where 1.0 is exact.

torch.ao's int8 PReLU (`quantized::prelu`, every x86 engine) stores the slopes as one per-tensor quint8
tensor and computes the positive side as if its slope 1.0 were a code on that same grid: when the
slopes' range stops short of 1.0, the positive half of the output is scaled by the largest slope the
grid holds. PyTorch's own choice for the slopes (a MinMaxObserver over them, default_quint8_weight_qconfig)
falls into it whenever every slope is below 1, as trained slopes are: on MTCNN's RNet (facenet-pytorch's
trained weights, slopes in [-0.67, 0.05]) the last PReLU's own SQNR was 0.7 dB and the model's 1.9 dB,
with PyTorch's FX default as with fxq. A random PReLU layer measured against its float simulation gave
6.6 dB with slopes in [0.1, 0.5] on a min-max grid, and rounding error only (positive side exact) on
this module's grid.

So the grid spans [min(slopes, 0), max(slopes, 1)] with a step of exactly 1/k, k an integer: 1.0 is then
code zero_point + k, and every slope lies within half a step of a code.
"""

from __future__ import annotations

import math

import torch
from torch.ao.quantization.observer import MinMaxObserver

# One code of the 256 is kept free: the zero point is rounded up, so the top code may be one past span*k.
_STEPS = 254


class PReLUSlopeObserver(MinMaxObserver):
    """Per-tensor quint8 qparams for PReLU slopes: the range reaches 1.0 and 1.0 falls on a code."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("dtype", torch.quint8)
        super().__init__(**kwargs)

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        low = min(float(self.min_val), 0.0)
        high = max(float(self.max_val), 1.0)
        steps_per_unit = max(1, math.floor(_STEPS / (high - low)))
        zero_point = min(math.ceil(-low * steps_per_unit), self.quant_max - steps_per_unit)
        device = self.min_val.device
        return (torch.tensor([1.0 / steps_per_unit], device=device),
                torch.tensor([zero_point], dtype=torch.int32, device=device))
