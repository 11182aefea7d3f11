"""onednn's fused conv + residual add (torch.ao's ConvAdd2d), as each runtime can run it in int8.

fxq's int8 model adds the residual to the conv's accumulator before the one requantization
(fxq/backend/conv_add.py). ONNX has no such op. Written exactly, DequantizeLinear -> Conv -> Add ->
QuantizeLinear ("fused", the default), OpenVINO fuses the unit into one int8 convolution with a sum
post-op, as onednn does, and matches fxq's torch model; ONNX Runtime has no int8 conv with a sum and runs
those convs in float (FusedConv), with layout transposes around them. With `conv_add="requantize"`,
the conv's output is rounded to 8 bits first, on a grid chosen here from calibration data, and ONNX
Runtime runs QLinearConv + QLinearAdd everywhere: this is the extra rounding fxq's fusion avoids.

On ImageNet MobileNetV2 (10 such convs) "requantize" costs 0.57 dB of logits SQNR against float in ONNX
Runtime, "fused" nothing; "fused" runs 1.1-1.8x slower than ONNX Runtime's own quantize_static model
there, "requantize" as fast. In OpenVINO both forms run every conv in u8. Figures and machine:
docs/design/onnx-export.md, bench/onnx_runtimes.md.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.backend.observers import AutoRangeObserver
from fxq.errors import InputError
from fxq.export.graph import ExportError

CONV_ADD_FORMS = ("fused", "requantize")
CONV_ADD_CLASSES = ("torch.ao.nn.intrinsic.quantized.modules.conv_add.ConvAdd2d",
                    "torch.ao.nn.intrinsic.quantized.modules.conv_add.ConvAddReLU2d")


def _conv_output(module: nn.Module, quantized_input: torch.Tensor) -> torch.Tensor:
    """The fused module's conv output before the add, in float: what the requantized form rounds."""
    if module.padding_mode != "zeros":
        raise ExportError(f"conv + add with padding_mode={module.padding_mode!r}: pass conv_add='fused'")
    return F.conv2d(quantized_input.dequantize(), module.weight().dequantize(), module.bias(), module.stride,
                    module.padding, module.dilation, module.groups)


def conv_output_grids(gm: fx.GraphModule, names: list[str], calibration_batches: Iterable[tuple] | None,
                      run: Any) -> dict[str, tuple[float, int]]:
    """{layer: (scale, zero point)} of the uint8 grid each named conv + add's conv output is rounded to:
    fxq's per-activation range choice (backend.observers.AutoRangeObserver) over the calibration batches.

    `run(batch)` runs the int8 model on one batch (on its own engine).
    """
    if calibration_batches is None:
        raise InputError(f"conv_add='requantize' rounds the output of {len(names)} conv(s) ({', '.join(names[:3])}"
                         f"{', ...' if len(names) > 3 else ''}) to 8 bits on a new grid; pass calibration_data "
                         "(the batches the model was calibrated on) to choose it, or keep conv_add='fused'")
    observers = {name: AutoRangeObserver(dtype=torch.quint8) for name in names}

    def observe(module: nn.Module, args: tuple, name: str) -> None:  # returns None: the call's args stay as they are
        observers[name](_conv_output(module, args[0]))

    handles = [gm.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: observe(module, args, name)) for name in names]
    try:
        with torch.no_grad():
            for batch in calibration_batches:
                run(batch)
    finally:
        for handle in handles:
            handle.remove()
    grids = {}
    for name, observer in observers.items():
        scale, zero_point = observer.calculate_qparams()
        grids[name] = (float(scale), int(zero_point))
    return grids
