"""x86's int8 depthwise convs, timed on this CPU: the island planner's table cannot say which ones are slow.

The x86 engine sends a depthwise conv with more than 100 channels to fbgemm. fbgemm's fast depthwise kernels
cover some shapes only; the rest fall to a reference loop 20-50x slower than float. The cost table
(frontend.islands) names two such cases (channels not a multiple of 8, dilation), and a third turned up on
EdgeNeXt: a 168-channel 9x9 depthwise conv took 3820 us in int8 against 86 us in float (Intel Xeon, 2
threads), which made the whole int8 model slower than float. Rather than grow the list, each such layer is
timed once, in float and in int8 at the shape it runs at, and the planner uses the times
(`find_float_islands(measured_us=)`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.ao.nn.quantized as nnq
from torch import fx, nn

from fxq.backend.engine import using_engine
from fxq.frontend.rewrite import unwrap
from fxq.report.latency import fastest_call_us, layer_inputs

__all__ = ["FBGEMM_MIN_GROUPS", "fbgemm_depthwise_times", "slow_fbgemm_depthwise"]

# x86 hands depthwise convs with more groups than this to fbgemm (fewer go to onednn).
FBGEMM_MIN_GROUPS = 100


def _fbgemm_depthwise(module: nn.Module) -> nn.Conv2d | None:
    conv = unwrap(module)[0]
    if not isinstance(conv, nn.Conv2d) or conv.groups != conv.in_channels or conv.groups <= FBGEMM_MIN_GROUPS:
        return None
    return conv if isinstance(conv.padding, tuple) else None  # padding="same" convs go float anyway


def _times_us(conv: nn.Conv2d, input_shape: torch.Size, engine: str) -> tuple[float, float]:
    """(float us, int8 us) of one call of `conv` at `input_shape` (random values: the kernels do not branch
    on them), the float conv channels-last as it runs inside an int8 model."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(input_shape, generator=generator).contiguous(memory_format=torch.channels_last)
    float_us = fastest_call_us(conv, (inputs,))
    with using_engine(engine):
        int8 = nnq.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        scales = conv.weight.detach().abs().amax(dim=(1, 2, 3)).clamp_min(1e-8) / 127
        weight = torch.quantize_per_channel(conv.weight.detach(), scales, torch.zeros_like(scales, dtype=torch.long),
                                            0, torch.qint8)
        int8.set_weight_bias(weight, None if conv.bias is None else conv.bias.detach())
        int8_us = fastest_call_us(int8, (torch.quantize_per_tensor(inputs, 0.05, 128, torch.quint8),))
    return float_us, int8_us


def _fbgemm_depthwise_convs(gm: fx.GraphModule) -> dict[str, nn.Conv2d]:
    """The depthwise convs of `gm` that the x86 engine would run on fbgemm, by name (a fused conv + ReLU
    named once)."""
    convs: dict[int, tuple[str, nn.Conv2d]] = {}
    for name, module in gm.named_modules():
        conv = _fbgemm_depthwise(module)
        if conv is not None:
            convs.setdefault(id(conv), (name, conv))
    return dict(convs.values())


def slow_fbgemm_depthwise(times_us: dict[str, tuple[float, float]]) -> list[str]:
    """The convs of `fbgemm_depthwise_times`'s result that take longer in int8 than in float."""
    return [name for name, (float_us, int8_us) in times_us.items() if int8_us > float_us]


def fbgemm_depthwise_times(gm: fx.GraphModule, example_inputs: tuple[Any, ...], engine: str
                           ) -> dict[str, tuple[float, float]]:
    """(float us, int8 us) by module name for each depthwise conv of `gm` that `engine` runs on fbgemm, at
    the input shape the example inputs give it; {} on other engines or without such convs."""
    if engine not in ("x86", "fbgemm"):
        return {}
    convs = _fbgemm_depthwise_convs(gm)
    if not convs:
        return {}
    inputs = layer_inputs(gm, example_inputs, convs)
    return {name: _times_us(conv, inputs[name][0].shape, engine) for name, conv in convs.items() if name in inputs}
