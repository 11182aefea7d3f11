"""fxq's int8 model as a standard ONNX QDQ model, for ONNX Runtime, OpenVINO and TensorRT.

torch.onnx.export cannot export torch.ao's int8 modules, so the converted fx graph is walked node by node
and the ONNX graph built directly: each int8 layer and function becomes a DequantizeLinear -> float op
-> QuantizeLinear unit carrying fxq's weights, biases and activation grids (fxq/export/int8_layers.py);
everything else is traced in float by torch.onnx.export, between DequantizeLinear and a QuantizeLinear on
the grid the int8 model produced when the op runs on quantized tensors (fxq/export/float_ops.py).

The int8 model is run once on the example inputs first: every node's actual output (quantized or not,
its scale, zero point and shape) is what the walk reads, so the ONNX grids are torch.ao's, whatever rule
computed them. Design and measurements: docs/design/onnx-export.md.
"""

from __future__ import annotations

import operator
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from fxq.errors import InputError, MissingExtraError
from fxq.export.float_ops import FLOAT_FUNCTIONS, SLOT, class_path, float_twin, splice_float_call
from fxq.export.graph import ExportError, OnnxGraph, Quantized, Unquantized, Value
from fxq.export.int8_layers import DYNAMIC_LINEAR_FORMS, INT8_FUNCTIONS, INT8_MODULES
from fxq.summary import summary_of
from fxq.validate import as_example_inputs

_IR_VERSION = 8  # the IR version of opset 17 (onnx 1.12): readable by every runtime that reads the opset
_DEQUANTIZE_FUNCTIONS = (torch.dequantize,)
_QUANTIZE_FUNCTIONS = (torch.quantize_per_tensor,)


def export_onnx(int8_model: torch.nn.Module, path: str | os.PathLike, example_inputs: Any, *,
                dynamic_linear: str = "integer") -> Path:
    """Write `int8_model` (as returned by `fxq.quantize`) to `path` as an ONNX QDQ model; returns the path.

    `example_inputs` (a tensor, a tuple of positional inputs or a dict of named ones) fixes the input
    shapes; the batch dimension stays dynamic unless the model reads a tensor's shape into Python numbers.
    `dynamic_linear` says how a dynamic int8 Linear (fxq's classifier head) is written: "integer"
    (DynamicQuantizeLinear + MatMulInteger, int8 in the runtime) or "float" (a float MatMul with the same
    int8-rounded weights). Raises ExportError naming the module or node that cannot be written faithfully.
    """
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("onnx", "fxq.export_onnx") from None
    if dynamic_linear not in DYNAMIC_LINEAR_FORMS:
        raise InputError(f"dynamic_linear={dynamic_linear!r} is not valid; choose one of "
                         f"{', '.join(map(repr, DYNAMIC_LINEAR_FORMS))}")
    if not isinstance(int8_model, fx.GraphModule):
        raise ExportError(f"export_onnx needs the fx.GraphModule fxq.quantize returns for a traced model, got "
                          f"{type(int8_model).__name__} (a model quantized as regions, with dynamic modules swapped "
                          "in place, or reloaded with fxq.load); export the quantized model before saving it")
    example_inputs = as_example_inputs(example_inputs, int8_model)
    model = _QdqWriter(int8_model, example_inputs, dynamic_linear).write()
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    onnx.save(model, path)
    return path


class _Recorder(fx.Interpreter):
    """Runs the int8 graph once and keeps a copy of every node's output (fused conv + add kernels may
    overwrite their residual input in place, so each output is copied when it is made)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.outputs: dict[fx.Node, Any] = {}

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        self.outputs[node] = pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, result)
        return result


def _record(gm: fx.GraphModule, example_inputs: tuple) -> dict[fx.Node, Any]:
    summary = summary_of(gm)
    previous = torch.backends.quantized.engine
    try:
        if summary is not None:  # onednn's fused conv + add runs on no other engine
            torch.backends.quantized.engine = summary.engine
        recorder = _Recorder(gm)
        with torch.no_grad():
            recorder.run(*example_inputs)
        return recorder.outputs
    finally:
        torch.backends.quantized.engine = previous


def _op_name(target: Any) -> str:
    """'quantized.add' for torch.ops.quantized.add and its overloads; '' for other targets."""
    name = str(target) if isinstance(target, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)) else ""
    return name.removesuffix(".default")


def _is_quantized(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_quantized


def _as_float_example(value: torch.Tensor) -> torch.Tensor:
    return value.dequantize() if value.is_quantized else value


class _QdqWriter:
    def __init__(self, gm: fx.GraphModule, example_inputs: tuple, dynamic_linear: str) -> None:
        self.gm, self.example_inputs, self.dynamic_linear = gm, example_inputs, dynamic_linear
        self.graph = OnnxGraph()
        self.values: dict[fx.Node, Value] = {}
        self.shape_readers: list[str] = []  # nodes that read a tensor's shape into Python numbers

    def write(self) -> Any:
        self.recorded = _record(self.gm, self.example_inputs)
        # a traced float op must not be told its batch is dynamic when the int8 graph computes with fixed shapes
        self.shape_readers = [node.name for node in self.gm.graph.nodes if node.op in ("call_function", "call_method")
                              and self._reads_shape(node)]
        self.dynamic_batch = not self.shape_readers
        if self.shape_readers:
            warnings.warn(f"export_onnx: {', '.join(self.shape_readers[:3])} read a tensor's shape into Python "
                          "numbers; the ONNX model is written for the example inputs' batch size only", stacklevel=3)
        for node in self.gm.graph.nodes:
            if node.op == "output":
                return self._model(node)
            try:
                self.values[node] = self._emit(node)
            except ExportError:
                raise
            except Exception as error:
                raise ExportError(f"{self._where(node)}: {type(error).__name__}: {error}") from error
        raise ExportError("the int8 graph has no output node")

    def _reads_shape(self, node: fx.Node) -> bool:
        reads_tensor = any(isinstance(self.recorded.get(arg), torch.Tensor) for arg in node.all_input_nodes)
        leaves = pytree.tree_leaves(self.recorded[node])
        return reads_tensor and bool(leaves) and not any(isinstance(v, torch.Tensor) for v in leaves)

    def _where(self, node: fx.Node) -> str:
        return str(node.target) if node.op in ("call_module", "get_attr") else node.name

    def _emit(self, node: fx.Node) -> Value:
        output = self.recorded.get(node)
        where = self._where(node)
        if node.op == "placeholder":
            return self._input(node, output)
        if node.op == "get_attr":
            return output
        args = fx.node.map_arg(node.args, self.values.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, self.values.__getitem__)
        if node.op == "call_module":
            module = self.gm.get_submodule(str(node.target))
            path = class_path(module)
            if path in INT8_MODULES:
                emit, options = INT8_MODULES[path]
                if emit.__name__ == "emit_dynamic_linear":
                    options = {**options, "form": self.dynamic_linear}
                return emit(self.graph, where, module, list(args), output, **options)
            twin = float_twin(module)
            if twin is None and path.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")):
                raise ExportError(f"{where}: int8 module {type(module).__name__} ({path}) has no ONNX QDQ form in "
                                  "fxq.export; keep it float (keep_float=[...]) to export the model")
            return self._traced(node, twin or module, args, kwargs, output, module=twin or module)
        if node.op == "call_method" and node.target == "dequantize" or node.target in _DEQUANTIZE_FUNCTIONS:
            return pytree.tree_map(lambda v: Unquantized(self.graph.as_float(v, where)), args[0],
                                   is_leaf=lambda v: isinstance(v, (Quantized, Unquantized)))
        if node.target in _QUANTIZE_FUNCTIONS:
            return self.graph.quantize(self.graph.as_float(args[0], where), output.q_scale(), output.q_zero_point(),
                                       output.dtype, where)
        op_name = _op_name(node.target)
        if op_name in INT8_FUNCTIONS:
            emit, options = INT8_FUNCTIONS[op_name]
            return emit(self.graph, where, list(args), output, **options)
        if node.target is operator.getitem and isinstance(args[0], (list, tuple)) and isinstance(args[1], int):
            return args[0][args[1]]
        leaves = pytree.tree_leaves(output)
        if leaves and not any(isinstance(v, torch.Tensor) for v in leaves):
            return output  # a shape or other Python number, fixed for the example inputs
        if op_name.startswith("quantized.") and op_name not in FLOAT_FUNCTIONS:
            raise ExportError(f"{where}: int8 function {op_name} has no ONNX QDQ form in fxq.export; keep the op "
                              "float (keep_float=[...]) to export the model")
        function = FLOAT_FUNCTIONS.get(op_name) or (
            getattr(torch.Tensor, str(node.target)) if node.op == "call_method" else node.target)
        return self._traced(node, function, args, kwargs, output)

    def _input(self, node: fx.Node, example: Any) -> Value:
        if not isinstance(example, torch.Tensor) or example.is_quantized:
            raise ExportError(f"input {node.name}: only tensor inputs can be exported, got {type(example).__name__}")
        return Unquantized(node.name)

    def _traced(self, node: fx.Node, function: Any, args: Any, kwargs: Any, output: Any,
                module: torch.nn.Module | None = None) -> Value:
        """Export one op in float with torch.onnx.export; quantize its outputs where torch's are quantized."""
        where = self._where(node)
        recorded_args = fx.node.map_arg((node.args, node.kwargs), lambda n: self.recorded[n])
        inputs: list[tuple[str, torch.Tensor]] = []

        def slot(value: Any, example: Any) -> Any:
            if isinstance(value, (Quantized, Unquantized)):
                inputs.append((self.graph.as_float(value, where), _as_float_example(example)))
                return SLOT
            return value

        values, spec = pytree.tree_flatten((args, kwargs), is_leaf=lambda v: isinstance(v, (Quantized, Unquantized)))
        examples, _ = pytree.tree_flatten(recorded_args)
        if len(values) != len(examples):
            raise ExportError(f"{where}: cannot match the op's arguments to their recorded values")
        arguments = pytree.tree_unflatten([slot(v, e) for v, e in zip(values, examples)], spec)
        names = splice_float_call(self.graph, where, function, arguments, inputs, self.dynamic_batch, module)
        outputs, output_spec = pytree.tree_flatten(output)
        if len(outputs) != len(names):
            raise ExportError(f"{where}: the traced op returns {len(names)} tensors, the int8 model {len(outputs)}")
        values = [self._as_recorded(name, value, where) for name, value in zip(names, outputs)]
        return pytree.tree_unflatten(values, output_spec)

    def _as_recorded(self, name: str, value: Any, where: str) -> Value:
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"{where}: returns a {type(value).__name__} next to tensors; fxq.export writes only "
                              "tensor outputs")
        if not value.is_quantized:
            return Unquantized(name)
        if value.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            raise ExportError(f"{where}: returns a tensor quantized {value.qscheme()}; fxq.export writes "
                              "per-tensor activation grids")
        return self.graph.quantize(name, value.q_scale(), value.q_zero_point(), value.dtype, where)

    def _model(self, output_node: fx.Node) -> Any:
        helper, g = self.graph.onnx.helper, self.graph
        values = pytree.tree_leaves(fx.node.map_arg(output_node.args[0], self.values.__getitem__),
                                    is_leaf=lambda v: isinstance(v, (Quantized, Unquantized)))
        examples = pytree.tree_leaves(self.recorded[output_node])
        outputs = []
        for index, (value, example) in enumerate(zip(values, examples, strict=True)):
            if not isinstance(value, (Quantized, Unquantized)):
                raise ExportError(f"output {index}: a {type(value).__name__}; fxq.export writes only tensor outputs")
            name = f"output_{index}"  # a quantized output is returned dequantized, as ONNX has no quantized tensors
            g.nodes.append(helper.make_node("Identity", [g.as_float(value, name)], [name], name=name))
            outputs.append(self._value_info(name, _as_float_example(example)))
        inputs = [self._value_info(node.name, self.recorded[node]) for node in self.gm.graph.nodes
                  if node.op == "placeholder"]
        graph = helper.make_graph(g.nodes, "fxq_int8", inputs, outputs, g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, version)
                                                        for domain, version in g.opsets.items()],
                                  producer_name="fxq", ir_version=_IR_VERSION)
        summary = summary_of(self.gm)
        helper.set_model_props(model, {
            "fxq.engine": summary.engine if summary is not None else torch.backends.quantized.engine,
            "fxq.dynamic_linear": self.dynamic_linear,
            "fxq.batch": "dynamic" if self.dynamic_batch else f"fixed: {', '.join(self.shape_readers)} read shapes"})
        return model

    def _value_info(self, name: str, example: torch.Tensor) -> Any:
        onnx = self.graph.onnx
        element_type = onnx.helper.np_dtype_to_tensor_dtype(example.numpy().dtype)
        shape = list(example.shape)
        if self.dynamic_batch and shape:
            shape[0] = "batch"
        return onnx.helper.make_tensor_value_info(name, element_type, shape)

