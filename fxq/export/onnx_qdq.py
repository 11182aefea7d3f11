"""fxq's int8 model as a standard ONNX QDQ model, for ONNX Runtime and OpenVINO.

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

import contextlib
import operator
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import fx
from torch.utils import _pytree as pytree  # private, but what fx itself uses to walk nested arguments

from fxq.calibration import materialize
from fxq.errors import InputError, MissingExtraError
from fxq.export.conv_add import (CONV_ADD_CLASSES, CONV_ADD_FORMS, choose_fused_tail, conv_output_grids,
                                 units_in_graph_order)
from fxq.export.float_ops import FLOAT_FUNCTIONS, Function, class_path, float_twin, splice_traced
from fxq.export.graph import ExportError, OnnxGraph, Quantized, Unquantized, Value
from fxq.export.int8_layers import DYNAMIC_LINEAR_FORMS, INT8_FUNCTIONS, INT8_MODULES
from fxq.summary import summary_of
from fxq.validate import as_example_inputs

_IR_VERSION = 8  # the IR version of opset 17 (onnx 1.12): readable by every runtime that reads the opset
_DEQUANTIZE_FUNCTIONS = (torch.dequantize,)
_QUANTIZE_FUNCTIONS = (torch.quantize_per_tensor,)


def export_onnx(int8_model: torch.nn.Module, path: str | os.PathLike, example_inputs: Any, *,
                conv_add: str = "fused", calibration_data: Iterable[Any] | None = None,
                dynamic_linear: str = "integer") -> Path:
    """Write `int8_model` (the fx.GraphModule `fxq.quantize` returns) to `path` as an ONNX QDQ model; returns
    the path.

    `example_inputs` (as for fxq.quantize) fixes the input shapes; dimension 0 is written as a dynamic batch.
    `conv_add`: how onednn's fused conv + residual add is written, "fused" (exact: OpenVINO runs it as one
    int8 conv, ONNX Runtime runs the conv in float), "requantize" (the conv's output rounded to 8 bits on
    a grid chosen on `calibration_data`, so that ONNX Runtime runs every conv in int8) or "auto" (for ONNX
    Runtime: "requantize", with the last units kept fused where ONNX Runtime's outputs on `calibration_data`
    show it pays; the model's "fxq.conv_add" metadata names them); see fxq/export/conv_add.py.
    `dynamic_linear`: how a dynamic int8 Linear (fxq's classifier head) is written, "integer"
    (DynamicQuantizeLinear + MatMulInteger) or "float" (a MatMul with the same
    int8-rounded weights). Raises ExportError naming the module or node that cannot be written faithfully.
    """
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("onnx", "fxq.export_onnx") from None
    for option, value, valid in (("conv_add", conv_add, CONV_ADD_FORMS),
                                 ("dynamic_linear", dynamic_linear, DYNAMIC_LINEAR_FORMS)):
        if value not in valid:
            raise InputError(f"{option}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")
    if calibration_data is not None and conv_add == "fused":
        raise InputError("calibration_data is read only with conv_add='requantize' or 'auto' (it chooses the grids "
                         "of the requantized conv outputs); leave it out with conv_add='fused'")
    if not isinstance(int8_model, fx.GraphModule):
        raise ExportError(f"export_onnx needs the fx.GraphModule fxq.quantize returns for a model whose forward "
                          f"traces, got {type(int8_model).__name__}: models quantized as regions or by swapping "
                          "dynamic modules in place, and models reloaded with fxq.load (TorchScript), cannot be "
                          "exported; export the model fxq.quantize returned, before saving it")
    example_inputs = as_example_inputs(example_inputs, int8_model)
    conv_grids: dict[str, tuple[float, int]] = {}
    fused = [name for name, module in int8_model.named_modules() if class_path(module) in CONV_ADD_CLASSES]
    kept_fused: list[str] = []
    if conv_add != "fused" and fused:
        batches = None if calibration_data is None else materialize(calibration_data, example_inputs)
        outputs: list[Any] = []  # the torch model's, on the batches: what "auto" compares ONNX Runtime's with
        with _on_its_engine(int8_model):
            conv_grids = conv_output_grids(int8_model, fused, batches,
                                           lambda batch: outputs.append(int8_model(*batch)), conv_add)
        if conv_add == "auto":
            conv_grids, kept_fused = _auto_conv_grids(int8_model, example_inputs, dynamic_linear, fused,
                                                      conv_grids, batches, outputs)
    model = _QdqWriter(int8_model, example_inputs, dynamic_linear, conv_grids, kept_fused).write()
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    onnx.save(model, path)
    return path


def _auto_conv_grids(gm: fx.GraphModule, example_inputs: tuple, dynamic_linear: str, fused: list[str],
                     grids: dict[str, tuple[float, int]], batches: list[tuple], expected: list[Any]
                     ) -> tuple[dict[str, tuple[float, int]], list[str]]:
    """conv_add='auto': which of the last conv + add units stay fused (export.conv_add.choose_fused_tail),
    `expected` being the torch model's outputs on `batches`."""
    input_names = [node.name if isinstance(value, torch.Tensor) else None
                   for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs)]
    return choose_fused_tail(units_in_graph_order(gm, fused), grids,
                             lambda candidate: _QdqWriter(gm, example_inputs, dynamic_linear, candidate).write(),
                             batches, expected, input_names)


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


@contextlib.contextmanager
def _on_its_engine(gm: fx.GraphModule) -> Iterator[None]:
    """Run the int8 model on the engine fxq built it for (onednn's fused conv + add runs on no other)."""
    summary = summary_of(gm)
    previous = torch.backends.quantized.engine
    try:
        if summary is not None:
            torch.backends.quantized.engine = summary.engine
        yield
    finally:
        torch.backends.quantized.engine = previous


def _record(gm: fx.GraphModule, example_inputs: tuple) -> dict[fx.Node, Any]:
    recorder = _Recorder(gm)
    with _on_its_engine(gm), torch.no_grad():
        recorder.run(*example_inputs)
    return recorder.outputs


def _op_name(target: Any) -> str:
    """'quantized.add' for torch.ops.quantized.add and its overloads; '' for other targets."""
    # torch._ops holds the only public-enough type of torch.ops.* callables
    name = str(target) if isinstance(target, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)) else ""
    return name.removesuffix(".default")


def _as_float_example(value: torch.Tensor) -> torch.Tensor:
    return value.dequantize() if value.is_quantized else value


def _is_value(value: Any) -> bool:
    return isinstance(value, (Quantized, Unquantized))


class _QdqWriter:
    def __init__(self, gm: fx.GraphModule, example_inputs: tuple, dynamic_linear: str,
                 conv_grids: dict[str, tuple[float, int]], kept_fused: list[str] | None = None) -> None:
        self.gm, self.example_inputs = gm, example_inputs
        self.dynamic_linear, self.conv_grids, self.kept_fused = dynamic_linear, conv_grids, kept_fused or []
        self.graph = OnnxGraph()
        self.values: dict[fx.Node, Value] = {}
        # nodes that compute Python numbers (a tensor's shape, arithmetic on it): kept as constants where a
        # hand-written unit reads them, recomputed inside the trace of each op that uses them, so that
        # ONNX computes them from the actual input (Shape, Gather, ...) and the batch stays dynamic
        self.numbers: set[fx.Node] = set()

    def write(self) -> Any:
        self.recorded = _record(self.gm, self.example_inputs)
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
        if node.op == "call_module":
            module = self.gm.get_submodule(str(node.target))
            path = class_path(module)
            if path in INT8_MODULES:
                emit, options = INT8_MODULES[path]
                if emit.__name__ == "emit_dynamic_linear":
                    options = {**options, "form": self.dynamic_linear}
                if str(node.target) in self.conv_grids:
                    options = {**options, "conv_grid": self.conv_grids[str(node.target)]}
                return emit(self.graph, where, module, list(args), output, **options)
            twin = float_twin(module)
            if twin is None and path.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")):
                raise ExportError(f"{where}: int8 module {type(module).__name__} ({path}) has no ONNX QDQ form in "
                                  "fxq.export; keep it float (keep_float=[...]) to export the model")
            return self._traced(node, output, twin or module)
        if node.op == "call_method" and node.target == "dequantize" or node.target in _DEQUANTIZE_FUNCTIONS:
            return pytree.tree_map(lambda v: Unquantized(self.graph.as_float(v, where)), args[0], is_leaf=_is_value)
        if node.target in _QUANTIZE_FUNCTIONS:
            return self.graph.quantize(self.graph.as_float(args[0], where), output.q_scale(), output.q_zero_point(),
                                       output.dtype, where)
        op_name = _op_name(node.target)
        if op_name in INT8_FUNCTIONS:
            emit, options = INT8_FUNCTIONS[op_name]
            return emit(self.graph, where, list(args), output, **options)
        if not any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(output)):
            self.numbers.add(node)
            return output
        if node.target is operator.getitem and isinstance(args[0], (list, tuple)) and isinstance(args[1], int):
            return args[0][args[1]]
        if op_name.startswith("quantized.") and op_name not in FLOAT_FUNCTIONS:
            raise ExportError(f"{where}: int8 function {op_name} has no ONNX QDQ form in fxq.export; keep the op "
                              "float (keep_float=[...]) to export the model")
        return self._traced(node, output, Function(FLOAT_FUNCTIONS[op_name]) if op_name else None)

    def _input(self, node: fx.Node, example: Any) -> Value:
        if isinstance(example, torch.Tensor) and not example.is_quantized:
            return Unquantized(node.name)
        if example is None or isinstance(example, (bool, int, float, str)):
            return example  # an argument left at its default (attn_mask=None): a constant of the graph
        raise ExportError(f"input {node.name}: only tensor inputs can be exported, got {type(example).__name__}")

    def _traced(self, node: fx.Node, output: Any, callee: torch.nn.Module | None) -> Value:
        """Export one op in float with torch.onnx.export, from dequantized inputs, with the number-computing
        nodes it reads; quantize its outputs on the int8 model's grids where those are quantized.

        `callee` is what a call_module node calls in float (the module, or an int8 module's float twin),
        or a Function standing in for an int8 function; None runs the node's own target.
        """
        where = self._where(node)
        graph, constants, inputs, copied = fx.Graph(), {}, [], {}

        def copy(source: fx.Node) -> Any:
            if source not in copied:
                value = self.values[source]
                if source in self.numbers:
                    copied[source] = graph.node_copy(source, copy)
                elif _is_value(value):
                    copied[source] = graph.placeholder(f"in_{len(inputs)}")
                    inputs.append((self.graph.as_float(value, where), _as_float_example(self.recorded[source])))
                elif isinstance(value, torch.Tensor):  # a tensor attribute of the int8 model
                    constants[f"constant_{len(constants)}"] = _as_float_example(value)
                    copied[source] = graph.get_attr(f"constant_{len(constants) - 1}")
                elif any(_is_value(leaf) for leaf in pytree.tree_leaves(value, is_leaf=_is_value)):
                    raise ExportError(f"{where}: reads {source.name}, a {type(value).__name__} of tensors, as a "
                                      "whole; fxq.export traces ops on tensors and numbers only")
                else:
                    copied[source] = value  # a constant: an argument left at its default
            return copied[source]

        call = graph.node_copy(node, copy)
        if not inputs:
            return output  # computed from the model's constants alone: a constant of the graph
        if callee is not None:
            constants["op"] = callee
            call.op, call.target = "call_module", "op"
        graph.output(call)
        traced = fx.GraphModule(constants, graph).eval()
        names = splice_traced(self.graph, where if callee is None or isinstance(callee, Function)
                              else f"{where} ({type(callee).__name__})", traced, inputs)
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
                  if node.op == "placeholder" and isinstance(self.values[node], Unquantized)]
        graph = helper.make_graph(g.nodes, "fxq_int8", inputs, outputs, g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, version)
                                                        for domain, version in g.opsets.items()],
                                  producer_name="fxq", ir_version=_IR_VERSION)
        summary = summary_of(self.gm)
        helper.set_model_props(model, {
            "fxq.engine": summary.engine if summary is not None else torch.backends.quantized.engine,
            "fxq.dynamic_linear": self.dynamic_linear,
            "fxq.conv_add": ("requantize" if self.conv_grids or self.kept_fused else "fused")
            + (f"; kept fused: {', '.join(self.kept_fused)}" if self.kept_fused else "")})
        return model

    def _value_info(self, name: str, example: torch.Tensor) -> Any:
        onnx = self.graph.onnx
        element_type = onnx.helper.np_dtype_to_tensor_dtype(example.numpy().dtype)
        shape: list[Any] = list(example.shape)
        if shape:
            shape[0] = "batch"
        return onnx.helper.make_tensor_value_info(name, element_type, shape)

