"""fxq's dynamic int8 Linear: torch.ao's, with the input grid the CPU's kernel can take and an optional
per-input-channel smoothing.

torch.ao's dynamic Linear always quantizes its input on 7 bits (`reduce_range=True` is written into its
forward), which only CPUs whose int8 kernel saturates 16-bit pair sums (no VNNI) need. fxq probes the
kernel (`engine.probe_kernel_saturation`) and uses 8 bits where it does not saturate; on BERT-style
encoders the 7-bit grid costs about 5 dB of embedding SQNR.

Smoothing (SmoothQuant's migration) divides input channel j by s_j and multiplies weight column j by s_j:
the float function is unchanged, and a transformer's few huge residual-stream channels stop taking the
whole per-tensor input grid. The division is one multiply by `input_scale` = 1/s before the kernel.
"""

from __future__ import annotations

import torch
import torch.ao.nn.quantized.dynamic as nnqd
from torch import nn
from torch.ao.quantization.observer import PerChannelMinMaxObserver, MinMaxObserver


def quantized_weight(weight: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """`weight` as torch.ao's dynamic qconfigs round it: symmetric int8, per output channel or per tensor."""
    observer = (PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
                if per_channel else MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric))
    observer(weight.detach().float())
    scale, zero_point = observer.calculate_qparams()
    if per_channel:
        return torch.quantize_per_channel(weight.detach().float(), scale.float(), zero_point.long(), 0, torch.qint8)
    return torch.quantize_per_tensor(weight.detach().float(), float(scale), int(zero_point), torch.qint8)


class DynamicLinear(nnqd.Linear):
    """A dynamic int8 Linear whose input is multiplied by `input_scale` (if `smoothed`) and quantized on
    7 bits only if `reduce_range`."""

    _FLOAT_MODULE = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias_: bool = True, dtype: torch.dtype = torch.qint8,
                 reduce_range: bool = True, input_scale: torch.Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bias_, dtype=dtype)
        self.reduce_range = reduce_range
        self.smoothed = input_scale is not None
        self.register_buffer("input_scale", input_scale.detach().float().clone() if input_scale is not None
                             else torch.ones(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smoothed:
            x = x * self.input_scale
        y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, self.reduce_range)
        return y.to(x.dtype)

    def _get_name(self) -> str:
        return "FxqDynamicQuantizedLinear"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reduce_range={self.reduce_range}, smoothed={self.smoothed}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, reduce_range: bool, smoothing: torch.Tensor | None = None,
                    per_channel: bool = True) -> "DynamicLinear":
        """From a float Linear; `smoothing` (s, one per input channel) scales the weight's columns by s and
        the input by 1/s."""
        weight = linear.weight.detach().float()
        if smoothing is not None:
            weight = weight * smoothing
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, reduce_range=reduce_range,
                     input_scale=None if smoothing is None else 1.0 / smoothing)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        module.set_weight_bias(quantized_weight(weight, per_channel), bias)
        return module

    @classmethod
    def from_int8(cls, int8_linear: nn.Module, reduce_range: bool) -> "DynamicLinear":
        """The same int8 weight and bias as torch.ao's static or dynamic int8 Linear `int8_linear`, with fxq's
        input grid."""
        weight, bias = int8_linear.weight(), int8_linear.bias()
        module = cls(weight.shape[1], weight.shape[0], bias is not None, reduce_range=reduce_range)
        module.set_weight_bias(weight, bias)
        return module
