"""Which output channels keep 8-bit weights on a kernel that saturates: measured on calibration data.

Without VNNI, x86 int8 kernels add each pair of u8 x s8 products in int16 (vpmaddubsw), which clips at
32767; select_engine then gives every layer 7-bit weights, so that no pair can overflow. Whether a
pair does overflow depends on the codes a layer actually reads and on the weights of each output
channel. After a ReLU most input codes are small; a tensor with negative values has its zero point
mid-range, so its codes sit near 128. Measured on ImageNet MobileNetV2 (AMD EPYC, AVX2, onednn, 8-bit
weights in every layer): each depthwise conv matched the exact computation on its int8 inputs at 85 to
100 dB and each projection conv at 46 to 70 dB, while the expansion convs, which read the residual
stream, fell to 23 to 43 dB. Inside those, the overflow sits in a few channels: 60 to 99% of an
expansion conv's output channels matched exact arithmetic (at most 0.01 codes^2 apart), while others
were off by up to 1300 codes^2 (Intel Xeon under ONEDNN_MAX_CPU_ISA=AVX2).

So each layer is run once on the engine with 8-bit weights, on one calibration batch, fed the inputs
the int8 model gives it (one layer's overflow does not move another's verdict), and each output channel
keeps 8-bit weights where the kernel's output matches exact arithmetic on the same int8 weights to
within an eighth of the output's rounding noise (a 7-bit channel is an 8-bit one with a larger scale:
backend.engine.MixedBitsWeightObserver). Overflow must be near zero, not merely smaller than the coarser
grid's error: the recovery passes correct the float simulation, which cannot overflow, so overflow error
is never corrected, while much of a 7-bit grid's is. On MobileNetV2 the rule keeps 8-bit weights in
16525 of 18056 output channels (28 of 53 layers entirely). Per layer instead of per channel it kept 35
layers (18 expansion convs and the first conv on 7 bits); crops 1/2 went from 20.62 to 20.83 dB
(bench/probe.py under the AVX2 caps).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.ao.quantization import QConfig

from fxq.backend.engine import EngineChoice, WeightGrid, convert, fake_quantize_weight, using_engine
from fxq.calibration import Batch
from fxq.frontend.rewrite import unwrap

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# Largest mean squared output error (in output codes squared) the kernel may add to its own exact
# computation for a layer to keep 8-bit weights: an eighth of the rounding noise of a uniform grid (1/12).
MAX_OVERFLOW_CODES2 = 0.01


@dataclass(frozen=True)
class LayerWeightBits:
    """One layer's measurement on one calibration batch, per output channel."""

    name: str
    eight_bit_error: torch.Tensor  # output error power, engine with 8-bit weights vs float weights
    seven_bit_error: torch.Tensor  # the same, exact arithmetic with 7-bit weights
    overflow: torch.Tensor  # mean squared difference (codes^2) between the engine and exact 8-bit arithmetic

    @property
    def eight_bit_channels(self) -> frozenset[int]:
        """The output channels that keep 8-bit weights: only where the kernel adds (almost) nothing to its
        own exact result, since the recovery passes correct the float simulation, which cannot overflow,
        so overflow error is never corrected. Together those channels must then be closer to the
        float-weight output than on 7 bits (one channel alone is not: where weight rounding is far below
        the output's own rounding noise, which of the two grids lands closer is a coin toss)."""
        keeps = self.overflow <= MAX_OVERFLOW_CODES2
        closer = float(self.eight_bit_error[keeps].sum()) < float(self.seven_bit_error[keeps].sum())
        if not bool(keeps.any()) or not closer:
            return frozenset()
        return frozenset(int(row) for row in keeps.nonzero().flatten())

    @property
    def channels(self) -> int:
        return self.overflow.numel()


@dataclass
class _Totals:
    eight_bit_error: torch.Tensor | float = 0.0
    seven_bit_error: torch.Tensor | float = 0.0
    overflow_codes2: torch.Tensor | float = 0.0
    outputs: int = 0


def _kind(module: nn.Module) -> tuple[str, bool, bool] | None:
    """(op, adds a residual, applies a ReLU) of an int8 conv / linear module, or None for one not measured
    (transposed convs, other fused activations, padding modes other than zeros)."""
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    kinds = {nnq.Conv1d: ("conv", False, False), nnq.Conv2d: ("conv", False, False),
             nnq.Conv3d: ("conv", False, False), nniq.ConvReLU1d: ("conv", False, True),
             nniq.ConvReLU2d: ("conv", False, True), nniq.ConvReLU3d: ("conv", False, True),
             nniq.ConvAdd2d: ("conv", True, False), nniq.ConvAddReLU2d: ("conv", True, True),
             nnq.Linear: ("linear", False, False), nniq.LinearReLU: ("linear", False, True)}
    kind = kinds.get(type(module))
    if kind and kind[0] == "conv" and module.padding_mode != "zeros":
        return None
    return kind


def _exact(module: nn.Module, kind: tuple[str, bool, bool], inputs: list[torch.Tensor],
           weight: torch.Tensor) -> torch.Tensor:
    op, adds, relu = kind
    x = inputs[0]
    if op == "linear":
        y = F.linear(x, weight, module.bias())
    else:
        y = _CONVS[weight.dim() - 2](x, weight, module.bias(), module.stride, module.padding, module.dilation,
                                     module.groups)
    if adds:
        y = y + inputs[1]
    return F.relu(y) if relu else y


def _requantize(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return torch.quantize_per_tensor(y, float(module.scale), int(module.zero_point), torch.quint8).dequantize()


def _output_range(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """`y` clipped to what the output grid can hold, so clipping (a fused ReLU6's ceiling) counts in neither error."""
    scale, zero_point = float(module.scale), int(module.zero_point)
    return y.clamp((0 - zero_point) * scale, (255 - zero_point) * scale)


def _float_weights(prepared: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Float weight of every observed conv / linear of a prepared model, by module name."""
    weights = {}
    for name, module in prepared.named_modules():
        layer, _ = unwrap(module)
        if layer is not None and getattr(module, "qconfig", None) is not None:
            weights[name] = layer.weight.detach()
    return weights


def with_weight_grid(prepared: fx.GraphModule, grid: WeightGrid) -> fx.GraphModule:
    """Point each observed layer's weight observer at its grid (`grid.of(name)`), in place.

    torch.ao's convert builds each weight observer from the module's own qconfig, so this is the one
    place a per-layer grid has to be set after calibration.
    """
    for name in _float_weights(prepared):
        module = prepared.get_submodule(name)
        module.qconfig = QConfig(activation=module.qconfig.activation, weight=grid.of(name).observer())
    return prepared


@torch.no_grad()
def measure_weight_bits(prepared: fx.GraphModule, choice: EngineChoice, grid: WeightGrid, batch: Batch,
                        conv_adds: tuple[str, ...] = ()) -> list[LayerWeightBits]:
    """Compare, per layer, the engine's 8-bit-weight output with an exact 7-bit-weight one (module doc).

    `prepared` is calibrated and not changed; `grid` is the 7-bit grid the engine choice gives.
    """
    float_weights = _float_weights(prepared)
    int8 = convert(with_weight_grid(copy.deepcopy(prepared), WeightGrid(grid.per_channel)), choice, conv_adds)
    seven = WeightGrid(grid.per_channel, seven_bit=True)
    totals: dict[str, _Totals] = {}
    saved: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in int8.named_modules():
        kind = _kind(module)
        if kind is None or name not in float_weights:
            continue

        def before(_module, args, name=name):
            # dequantized copies: conv2d_add may write its output over the residual input
            saved[name] = [a.dequantize() if isinstance(a, torch.Tensor) and a.is_quantized else a for a in args]

        def after(module, _args, output, name=name, kind=kind):
            inputs = saved.pop(name)
            if not isinstance(output, torch.Tensor) or not output.is_quantized \
                    or not all(isinstance(a, torch.Tensor) for a in inputs):
                return
            weight = float_weights[name]
            exact = _output_range(module, _exact(module, kind, inputs, weight))
            seven_bit = _requantize(module, _exact(module, kind, inputs, fake_quantize_weight(weight, seven)))
            eight_bit = _requantize(module, _exact(module, kind, inputs, module.weight().dequantize()))
            engine_output = output.dequantize()
            total = totals.setdefault(name, _Totals())
            channel_dim = 1 if kind[0] == "conv" else -1
            total.eight_bit_error += _per_channel((engine_output - exact).pow(2), channel_dim)
            total.seven_bit_error += _per_channel((seven_bit - exact).pow(2), channel_dim)
            total.overflow_codes2 += _per_channel((engine_output - eight_bit).pow(2), channel_dim) \
                / float(module.scale) ** 2
            total.outputs += output.numel() // output.shape[channel_dim]

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with using_engine(choice.engine):
            int8(*batch)
    finally:
        for handle in handles:
            handle.remove()
    return [LayerWeightBits(name, t.eight_bit_error, t.seven_bit_error, t.overflow_codes2 / t.outputs)
            for name, t in totals.items()]


def _per_channel(error: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Sum of an error over everything but the output channel dimension (1 for convs, -1 for linears)."""
    channel_dim %= error.dim()
    return error.sum([dim for dim in range(error.dim()) if dim != channel_dim])


def measured_weight_grid(prepared: fx.GraphModule, grid: WeightGrid, choice: EngineChoice, batch: Batch,
                         conv_adds: tuple[str, ...]) -> tuple[WeightGrid, EngineChoice]:
    """On a saturating kernel, give 8-bit weights back to the output channels measured not to overflow
    (with per-tensor weights, to the layers where every channel can), in `prepared` too; the engine
    choice's reason says how many."""
    measured = measure_weight_bits(prepared, choice, grid, batch, conv_adds)
    kept = {m.name: m.eight_bit_channels for m in measured}
    if not grid.per_channel:
        kept = {m.name: kept[m.name] for m in measured if len(kept[m.name]) == m.channels}
    grid = dataclasses.replace(grid, eight_bit_channels={name: rows for name, rows in kept.items() if rows})
    with_weight_grid(prepared, grid)
    channels = sum(m.channels for m in measured)
    whole = sum(1 for m in measured if len(kept.get(m.name, ())) == m.channels)
    reason = f"{choice.reason}; measured not to overflow, {sum(map(len, kept.values()))} of {channels} output " \
             f"channels keep 8-bit weights ({whole} of {len(measured)} layers entirely)"
    return grid, dataclasses.replace(choice, reason=reason)
