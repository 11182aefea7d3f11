"""Ops without a hand-written QDQ unit, exported by torch.onnx.export and spliced into the graph.

Float islands, kept-float layers and untraceable float leaves run float in the int8 model and are traced
as they are. Ops that torch runs on quantized tensors without weights (pooling, ReLU, flatten, cat,
hardswish, layer norm, ...) compute what their float version computes on the dequantized input, rounded
to the output grid: they are traced in float from the dequantized inputs (a float twin of the int8
module or function), and the output is quantized on the grid the int8 model produced. The runtimes
then fuse DequantizeLinear -> MaxPool / Concat / GlobalAveragePool / ... -> QuantizeLinear into their
int8 kernels, or drop the pair around pure data movement.

Tracing uses the TorchScript exporter (`dynamo=False`: no onnxscript dependency). Its TracerWarnings
(Python control flow on tensor values, a tensor turned into a Python number) are raised as errors: the
trace would hold only the branch the example took, a silently different model.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree  # private, but what fx itself uses to walk nested values

from fxq.export.graph import OPSET, ExportError, OnnxGraph

_AO = "torch.ao.nn.quantized.modules."

# int8 modules without weights -> the float class whose forward they quantize (a copy is re-classed)
_FLOAT_CLASSES: dict[str, type[nn.Module]] = {
    _AO + "activation.Hardswish": nn.Hardswish, _AO + "activation.ELU": nn.ELU,
    _AO + "activation.LeakyReLU": nn.LeakyReLU, _AO + "activation.ReLU6": nn.ReLU6,
    _AO + "activation.Sigmoid": nn.Sigmoid, _AO + "activation.Softmax": nn.Softmax,
    _AO + "normalization.LayerNorm": nn.LayerNorm, _AO + "normalization.GroupNorm": nn.GroupNorm,
    **{_AO + f"normalization.InstanceNorm{d}d": getattr(nn, f"InstanceNorm{d}d") for d in (1, 2, 3)},
    **{_AO + f"batchnorm.BatchNorm{d}d": getattr(nn, f"BatchNorm{d}d") for d in (2, 3)},
    _AO + "dropout.Dropout": nn.Dropout,
}


def _prelu(module: nn.Module) -> nn.Module:
    twin = nn.PReLU(module.weight.numel())
    twin.weight.data = module.weight.dequantize().reshape(twin.weight.shape)  # torch's int8 slopes, as rounded
    return twin


def _bn_relu(module: nn.Module) -> nn.Module:
    bn = copy.copy(module)
    bn.__class__ = getattr(nn, f"BatchNorm{type(module).__name__[-2]}d")
    return nn.Sequential(bn, nn.ReLU())


_FLOAT_BUILDERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    _AO + "activation.PReLU": _prelu,
    **{f"torch.ao.nn.intrinsic.quantized.modules.bn_relu.BNReLU{d}d": _bn_relu for d in (2, 3)},
}


def float_twin(module: nn.Module) -> nn.Module | None:
    """The float module an int8 module without weights computes on dequantized inputs, or None."""
    path = class_path(module)
    if path in _FLOAT_BUILDERS:
        return _FLOAT_BUILDERS[path](module)
    if path in _FLOAT_CLASSES:
        twin = copy.copy(module)
        twin.__class__ = _FLOAT_CLASSES[path]
        return twin
    return None


# torch.ops.quantized functions without weights -> their float computation; parameter names follow the ops'
# schemas (torch.ao passes some as keywords), the output grid (output_scale, output_zero_point) is dropped
FLOAT_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "quantized.hardswish": lambda input, output_scale, output_zero_point: F.hardswish(input),
    "quantized.elu": lambda self, output_scale, output_zero_point, alpha=1.0, scale=1.0, input_scale=1.0:
        scale * F.elu(input_scale * self, alpha),
    "quantized.celu": lambda self, output_scale, output_zero_point, alpha=1.0: F.celu(self, alpha),
    "quantized.leaky_relu": lambda qx, negative_slope, inplace, output_scale, output_zero_point:
        F.leaky_relu(qx, negative_slope),
    "quantized.sigmoid": lambda qx, output_scale, output_zero_point: torch.sigmoid(qx),
    "quantized.softmax": lambda qx, dim, output_scale, output_zero_point: torch.softmax(qx, dim),
    "quantized.relu6": lambda qx, inplace=False: F.relu6(qx),
    "quantized.clamp": lambda qx, min=None, max=None: torch.clamp(qx, min, max),
    "quantized.threshold": lambda qx, threshold, value: F.threshold(qx, threshold, value),
    "quantized.cat": lambda qx, dim, scale=None, zero_point=None: torch.cat(qx, dim),
    "quantized.layer_norm": lambda input, normalized_shape, weight, bias, eps, output_scale, output_zero_point:
        F.layer_norm(input, normalized_shape, weight, bias, eps),
    "quantized.group_norm": lambda input, num_groups, weight, bias, eps, output_scale, output_zero_point:
        F.group_norm(input, num_groups, weight, bias, eps),
    "quantized.instance_norm": lambda input, weight, bias, eps, output_scale, output_zero_point:
        F.instance_norm(input, weight=weight, bias=bias, eps=eps),
    **{f"quantized.batch_norm{d}d": lambda qx, weight, bias, mean, var, eps, output_scale, output_zero_point:
        F.batch_norm(qx, mean, var, weight, bias, False, 0.0, eps) for d in (1, 2, 3)},
}


def class_path(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


class Function(nn.Module):
    """A function as a module, so that a graph can call it whatever its name (lambdas included)."""

    def __init__(self, function: Callable[..., Any]) -> None:
        super().__init__()
        self.function = function

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)


def splice_traced(g: OnnxGraph, where: str, call: nn.Module, inputs: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Trace `call(*example tensors)` with torch.onnx.export (batch dimension dynamic) and add its nodes to `g`.

    `inputs` pairs each of call's inputs with the ONNX tensor that feeds it: (name, example float tensor).
    Returns the ONNX names of the call's output tensors, in pytree order.
    """
    examples = tuple(tensor for _, tensor in inputs)
    with torch.no_grad():
        outputs = pytree.tree_leaves(call(*examples))
    input_names = [f"in_{i}" for i in range(len(inputs))]
    output_names = [f"out_{i}" for i in range(len(outputs))]
    dynamic_axes = {name: {0: "batch"} for name, tensor in zip(input_names + output_names, [*examples, *outputs])
                    if isinstance(tensor, torch.Tensor) and tensor.dim() > 0}
    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(call, examples, buffer, dynamo=False, opset_version=OPSET, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
        except Exception as error:
            raise ExportError(f"{where}: torch.onnx.export cannot export it ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); write it with plain tensor "
                              "ops that torch.onnx.export supports to export the model") from error
    tracer_warnings = [str(w.message).split(". ")[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if tracer_warnings:
        raise ExportError(f"{where}: runs Python code a trace cannot follow ({tracer_warnings[0]}); the ONNX graph "
                          "would hold only the path the example inputs took. Write it with tensor ops a trace records "
                          "(torch.where instead of a Python if on a tensor's value or shape) to export the model")
    return _splice(g, where, g.onnx.load_from_string(buffer.getvalue()), [name for name, _ in inputs],
                   output_names)


def _splice(g: OnnxGraph, where: str, model: Any, input_names: list[str], output_names: list[str]) -> list[str]:
    graph = model.graph
    for opset in model.opset_import:
        if opset.domain not in ("", "ai.onnx") and g.opsets.setdefault(opset.domain, opset.version) != opset.version:
            raise ExportError(f"{where}: traced with opset {opset.domain} {opset.version}, the graph has another")
    renamed = {f"in_{i}": name for i, name in enumerate(input_names)}
    renamed[""] = ""  # an omitted optional input
    prefix = g.fresh(where)

    def name_of(tensor: str) -> str:
        return renamed.setdefault(tensor, f"{prefix}/{tensor}")

    for initializer in graph.initializer:
        initializer.name = name_of(initializer.name)
        g.initializers.append(initializer)
    for node in graph.node:
        if any(attribute.type in (attribute.GRAPH, attribute.GRAPHS) for attribute in node.attribute):
            raise ExportError(f"{where}: traced into an ONNX {node.op_type} with a subgraph, which fxq does not splice")
        node.input[:] = [name_of(name) for name in node.input]
        node.output[:] = [name_of(name) for name in node.output]
        node.name = f"{prefix}/{node.name or node.op_type}"
        g.nodes.append(node)
    # an output that is one of the inputs (an identity op) is returned as that input's name
    return [name_of(name) for name in output_names]
