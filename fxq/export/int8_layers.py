"""ONNX QDQ units for torch.ao's int8 layers and int8 functions, looked up by class path or op in tables.

Each static int8 layer becomes DequantizeLinear(int8 weight, per-channel scales on axis 0) and
DequantizeLinear(int32 bias on the grid input scale x weight scale), the float op on the dequantized input,
any fused Add / Relu, then QuantizeLinear on the layer's own output grid: ONNX Runtime fuses the unit into
QLinearConv / QGemm, OpenVINO into its int8 convolution. The bias is written as int32 codes because ONNX
Runtime only fuses a Conv whose every input comes from a DequantizeLinear; at the grid the int8 kernels
accumulate on, rounding the bias moves it by at most half an accumulator step.

No torch.ao import: modules are matched by their class path (torch.ao.quantization is deprecated upstream
and only fxq/backend/ imports it).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from fxq.export.graph import ExportError, OnnxGraph, Quantized, Unquantized, Value, code_type

_INT32 = np.iinfo(np.int32)


def _weight_codes(weight: torch.Tensor, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
    """(int codes, scales, zero points, axis or None) of an int8 weight tensor."""
    codes = weight.int_repr().numpy().astype(code_type(weight.dtype, where)[1])
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return (codes, weight.q_per_channel_scales().numpy().astype(np.float32),
                weight.q_per_channel_zero_points().numpy(), int(weight.q_per_channel_axis()))
    if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return codes, np.float32(weight.q_scale()), np.asarray(weight.q_zero_point()), None
    raise ExportError(f"{where}: weight qscheme {weight.qscheme()} has no ONNX QDQ form")


def _int8_weight(g: OnnxGraph, weight: torch.Tensor, where: str, transpose: bool = False) -> tuple[str, Any]:
    """DequantizeLinear of the layer's int8 weight (optionally as (in, out) for MatMul); returns the float
    tensor name and the weight scales (per output channel or one)."""
    codes, scales, zero_points, axis = _weight_codes(weight, where)
    if transpose:
        codes, axis = codes.T.copy(), (None if axis is None else 1 - axis)
    return g.dequantized_constant(codes, scales, zero_points, axis, f"{where}.weight"), scales


def _int32_bias(g: OnnxGraph, bias: torch.Tensor | None, input_scale: float, weight_scales: Any, where: str
                ) -> list[str]:
    if bias is None:
        return []
    grid = (np.float64(input_scale) * np.asarray(weight_scales, dtype=np.float64)).astype(np.float32)
    grid = np.broadcast_to(grid, bias.shape).copy()
    codes = np.clip(np.round(bias.detach().double().numpy() / grid), _INT32.min, _INT32.max).astype(np.int32)
    return [g.dequantized_constant(codes, grid, np.zeros_like(codes), 0, f"{where}.bias")]


def _quantized_input(value: Value, where: str) -> Quantized:
    if not isinstance(value, Quantized):
        raise ExportError(f"{where}: an int8 layer reads a {type(value).__name__} value, not a quantized tensor")
    return value


def _output(g: OnnxGraph, float_name: str, meta: Any, where: str) -> Quantized:
    return g.quantize(float_name, meta.q_scale(), meta.q_zero_point(), meta.dtype, where)


_PADDING_MODES = {"zeros": None, "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def emit_conv(g: OnnxGraph, where: str, module: nn.Module, inputs: list[Value], meta: Any, *, relu: bool = False,
              add: bool = False, conv_grid: tuple[float, int] | None = None) -> Quantized:
    """int8 Conv{1,2,3}d, ConvReLU, and onednn's ConvAdd / ConvAddReLU (conv + residual in one kernel)."""
    x = _quantized_input(inputs[0], where)
    x_float = g.dequantize(x, where)
    spatial = len(module.kernel_size)
    padding = list(module.padding)
    mode = _PADDING_MODES.get(module.padding_mode, "?")
    if mode == "?":
        raise ExportError(f"{where}: padding_mode={module.padding_mode!r} has no ONNX Pad mode")
    if mode is not None:  # torch pads the int8 input before the kernel; Pad commutes with the dequantize
        pads = g.constant(np.asarray([0, 0] + padding + [0, 0] + padding, dtype=np.int64), "pads")
        x_float = g.add("Pad", [x_float, pads], where, mode=mode)
        padding = [0] * spatial
    weight, weight_scales = _int8_weight(g, module.weight(), where)
    bias = _int32_bias(g, module.bias(), x.scale, weight_scales, where)
    y = g.add("Conv", [x_float, weight, *bias], where, kernel_shape=list(module.kernel_size),
              strides=list(module.stride), pads=padding + padding, dilations=list(module.dilation),
              group=int(module.groups))
    if add:
        if conv_grid is not None:
            y = g.dequantize(g.quantize(y, *conv_grid, meta.dtype, where), where)
        y = g.add("Add", [y, g.as_float(inputs[1], where)], where)
    if relu:
        y = g.add("Relu", [y], where)
    return _output(g, y, meta, where)


def _gemm(g: OnnxGraph, where: str, module: nn.Module, x: Quantized, relu: bool, out_meta: Any) -> Quantized:
    weight, weight_scales = _int8_weight(g, module.weight(), where)
    bias = _int32_bias(g, module.bias(), x.scale, weight_scales, where)
    y = g.add("Gemm", [g.dequantize(x, where), weight, *bias], where, transB=1)
    if relu:
        y = g.add("Relu", [y], where)
    return _output(g, y, out_meta, where)


def emit_linear(g: OnnxGraph, where: str, module: nn.Module, inputs: list[Value], meta: Any, *,
                relu: bool = False) -> Quantized:
    """int8 Linear / LinearReLU as a Gemm. Inputs of rank > 2 are flattened to 2-D and the output reshaped
    back, each reshape between a DequantizeLinear and a QuantizeLinear on its own grid (exact, and dropped
    by the runtimes' QDQ fusion)."""
    x = _quantized_input(inputs[0], where)
    if len(meta.shape) == 2:
        return _gemm(g, where, module, x, relu, meta)
    x_float = g.dequantize(x, where)
    flat = g.quantize(g.add("Flatten", [x_float], where, axis=len(meta.shape) - 1), x.scale, x.zero_point,
                      x.dtype, where)
    y = _gemm(g, where, module, flat, relu, meta)
    leading = g.add("Slice", [g.add("Shape", [x_float], where), g.constant(np.asarray([0]), "start"),
                              g.constant(np.asarray([-1]), "end")], where)
    shape = g.add("Concat", [leading, g.constant(np.asarray([meta.shape[-1]]), "features")], where, axis=0)
    return g.quantize(g.add("Reshape", [g.dequantize(y, where), shape], where), y.scale, y.zero_point, y.dtype,
                      where)


# How the dynamic int8 head is written (export_onnx's `dynamic_linear`):
DYNAMIC_LINEAR_FORMS = ("integer", "float")


def emit_dynamic_linear(g: OnnxGraph, where: str, module: nn.Module, inputs: list[Value], meta: Any, *,
                        form: str) -> Unquantized:
    """torch.ao's dynamic int8 Linear: float in, float out, int8 weights.

    "integer": DynamicQuantizeLinear + MatMulInteger, ONNX Runtime's dynamic form (fused into its
    DynamicQuantizeMatMul); the input is quantized on each call's range as torch does, but on 255 levels
    where torch.ao's kernel uses 127 (reduce_range; fxq's DynamicLinear uses 255 where the CPU's kernel
    does not saturate). "float": a float MatMul with the dequantized int8 weights.
    """
    x = g.as_float(inputs[0], where)
    if getattr(module, "smoothed", False):  # fxq's DynamicLinear: the input scaled per channel first
        x = g.add("Mul", [x, g.constant(module.input_scale.detach().numpy().astype(np.float32),
                                        f"{where}.input_scale")], where)
    if form == "float":
        weight, _ = _int8_weight(g, module.weight(), where, transpose=True)
        y = g.add("MatMul", [x, weight], where)
    else:
        codes, scales, zero_points, _axis = _weight_codes(module.weight(), where)
        if np.any(zero_points != 0):
            raise ExportError(f"{where}: dynamic int8 Linear with nonzero weight zero points; pass "
                              "dynamic_linear='float'")
        x_codes, x_scale, x_zero_point = g.add("DynamicQuantizeLinear", [x], where, outputs=3)
        weight = g.constant(codes.T.copy(), f"{where}.weight_codes")
        zeros = g.constant(np.zeros(codes.shape[0], dtype=codes.dtype), f"{where}.weight_zero_point")
        accumulators = g.add("MatMulInteger", [x_codes, weight, x_zero_point, zeros], where)
        y_scale = g.add("Mul", [x_scale, g.constant(np.asarray(scales, dtype=np.float32), f"{where}.weight_scale")],
                        where)
        y = g.add("Mul", [g.add("Cast", [accumulators], where, to=1), y_scale], where)
    bias = module.bias()
    if bias is not None:
        y = g.add("Add", [y, g.constant(bias.detach().numpy().astype(np.float32), f"{where}.bias")], where)
    return Unquantized(y)


Emitter = Callable[..., Value]

# int8 modules by class path -> (emitter, its keyword arguments)
INT8_MODULES: dict[str, tuple[Emitter, dict[str, Any]]] = {
    **{f"torch.ao.nn.quantized.modules.conv.Conv{d}d": (emit_conv, {}) for d in (1, 2, 3)},
    **{f"torch.ao.nn.intrinsic.quantized.modules.conv_relu.ConvReLU{d}d": (emit_conv, {"relu": True})
       for d in (1, 2, 3)},
    "torch.ao.nn.intrinsic.quantized.modules.conv_add.ConvAdd2d": (emit_conv, {"add": True}),
    "torch.ao.nn.intrinsic.quantized.modules.conv_add.ConvAddReLU2d": (emit_conv, {"add": True, "relu": True}),
    "torch.ao.nn.quantized.modules.linear.Linear": (emit_linear, {}),
    "torch.ao.nn.intrinsic.quantized.modules.linear_relu.LinearReLU": (emit_linear, {"relu": True}),
    "torch.ao.nn.quantized.dynamic.modules.linear.Linear": (emit_dynamic_linear, {}),
    "fxq.backend.dynamic_linear.DynamicLinear": (emit_dynamic_linear, {}),
}


def emit_binary(g: OnnxGraph, where: str, inputs: list[Value], meta: Any, *, op: str, relu: bool = False
                ) -> Quantized:
    """quantized::add / mul / matmul (and the _relu forms): DequantizeLinear both inputs, the float op, Relu,
    QuantizeLinear on the op's output grid (ONNX Runtime: QLinearAdd, QLinearMul, QLinearMatMul)."""
    y = g.add(op, [g.as_float(inputs[0], where), g.as_float(inputs[1], where)], where)
    if relu:
        y = g.add("Relu", [y], where)
    return _output(g, y, meta, where)


def emit_scalar(g: OnnxGraph, where: str, inputs: list[Value], meta: Any, *, op: str) -> Quantized:
    """quantized::add_scalar / mul_scalar: the scalar as a float constant, the output on torch's grid."""
    scalar = g.constant(np.asarray(float(inputs[1]), dtype=np.float32), "scalar")
    return _output(g, g.add(op, [g.as_float(inputs[0], where), scalar], where), meta, where)


# torch.ops.quantized functions by name -> (emitter, its keyword arguments)
INT8_FUNCTIONS: dict[str, tuple[Emitter, dict[str, Any]]] = {
    "quantized.add": (emit_binary, {"op": "Add"}),
    "quantized.add_relu": (emit_binary, {"op": "Add", "relu": True}),
    "quantized.mul": (emit_binary, {"op": "Mul"}),
    "quantized.mul_relu": (emit_binary, {"op": "Mul", "relu": True}),
    "quantized.matmul": (emit_binary, {"op": "MatMul"}),
    "quantized.add_scalar": (emit_scalar, {"op": "Add"}),
    "quantized.mul_scalar": (emit_scalar, {"op": "Mul"}),
}
