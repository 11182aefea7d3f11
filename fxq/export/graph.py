"""The ONNX graph under construction: named tensors, initializers, QuantizeLinear / DequantizeLinear pairs.

Values of the fx graph map onto ONNX tensors as `Quantized` (the 8-bit output of a QuantizeLinear, with
its grid) or `Unquantized`. A consumer that reads a quantized value gets a DequantizeLinear of its own: ONNX
Runtime and OpenVINO match their int8 kernels on DequantizeLinear -> op -> QuantizeLinear units, and a
DequantizeLinear shared by two ops would have to be duplicated by the runtime first.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from fxq.errors import ExportError

OPSET = 17  # per-axis QuantizeLinear/DequantizeLinear need 13; 17 is read by ONNX Runtime, OpenVINO, TensorRT

# torch quantized dtypes and the ONNX element types and numpy dtypes of their codes
_CODE_TYPES = {torch.quint8: ("UINT8", np.uint8), torch.qint8: ("INT8", np.int8), torch.qint32: ("INT32", np.int32)}


@dataclass(frozen=True)
class Quantized:
    """An 8-bit ONNX tensor (a QuantizeLinear's output) and the grid its codes are on."""

    name: str
    scale: float
    zero_point: int
    dtype: torch.dtype = torch.quint8


@dataclass(frozen=True)
class Unquantized:
    """An ONNX tensor that is not quantized: float32 (or an integer input such as token ids)."""

    name: str


Value = Any  # Quantized, Unquantized, a Python constant, or a list/tuple of them


def code_type(dtype: torch.dtype, where: str) -> tuple[str, type]:
    if dtype not in _CODE_TYPES:
        raise ExportError(f"{where}: quantized dtype {dtype} has no ONNX QDQ equivalent (quint8, qint8, qint32 do)")
    return _CODE_TYPES[dtype]


class OnnxGraph:
    """Nodes and initializers of one ONNX graph, with unique tensor names."""

    def __init__(self) -> None:
        import onnx  # checked by the caller: fxq.export needs the optional extra

        self.onnx = onnx
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.opsets: dict[str, int] = {"": OPSET}
        self._counter = itertools.count()
        self._constants: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        return f"{hint.replace('.', '_')}__{next(self._counter)}"

    def constant(self, array: np.ndarray, hint: str) -> str:
        """An initializer holding `array` (scalars and small grids are shared by value)."""
        array = np.array(array, order="C")  # (np.ascontiguousarray would make a scalar 1-D)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 16 else None
        if key is not None and key in self._constants:
            return self._constants[key]
        name = self.fresh(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        if key is not None:
            self._constants[key] = name
        return name

    def add(self, op_type: str, inputs: Sequence[str], hint: str, outputs: int = 1, domain: str = "",
            **attributes: Any) -> Any:
        """Append one node; returns its output name (or names, when `outputs` > 1)."""
        names = [self.fresh(f"{hint}_{op_type}") for _ in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), names, name=self.fresh(hint),
                                                     domain=domain, **attributes))
        return names[0] if outputs == 1 else names

    def _grid(self, scale: Any, zero_point: Any, dtype: torch.dtype, hint: str) -> list[str]:
        numpy_type = code_type(dtype, hint)[1]
        return [self.constant(np.asarray(scale, dtype=np.float32), "scale"),
                self.constant(np.asarray(zero_point, dtype=numpy_type), "zero_point")]

    def quantize(self, float_name: str, scale: float, zero_point: int, dtype: torch.dtype, hint: str) -> Quantized:
        name = self.add("QuantizeLinear", [float_name, *self._grid(scale, zero_point, dtype, hint)], hint)
        return Quantized(name, float(scale), int(zero_point), dtype)

    def dequantize(self, value: Quantized, hint: str) -> str:
        return self.add("DequantizeLinear", [value.name, *self._grid(value.scale, value.zero_point, value.dtype, hint)],
                        hint)

    def dequantized_constant(self, codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None,
                             hint: str) -> str:
        """DequantizeLinear of a constant code tensor (weights, biases): per tensor, or per channel on `axis`."""
        inputs = [self.constant(codes, f"{hint}_codes"), self.constant(scale.astype(np.float32), f"{hint}_scale"),
                  self.constant(zero_point.astype(codes.dtype), f"{hint}_zero_point")]
        return self.add("DequantizeLinear", inputs, hint, **({} if axis is None else {"axis": axis}))

    def as_float(self, value: Value, hint: str) -> str:
        """The float32 tensor name of a value: a quantized one through a DequantizeLinear of its own."""
        if isinstance(value, Quantized):
            return self.dequantize(value, hint)
        if isinstance(value, Unquantized):
            return value.name
        if isinstance(value, torch.Tensor) and (value.is_quantized or value.is_floating_point()):
            value = value.dequantize() if value.is_quantized else value
            return self.constant(value.detach().numpy().astype(np.float32), f"{hint}_constant")
        raise ExportError(f"{hint}: expected a tensor, got {type(value).__name__} {value!r:.80}")
