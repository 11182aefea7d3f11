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
from torch.utils import _pytree as pytree

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


# torch.ops.quantized functions without weights -> their float computation (output grid arguments dropped)
FLOAT_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "quantized.hardswish": lambda x, scale, zero_point: F.hardswish(x),
    "quantized.elu": lambda x, scale, zero_point, alpha=1.0, out=1.0, inner=1.0: out * F.elu(inner * x, alpha),
    "quantized.celu": lambda x, scale, zero_point, alpha=1.0: F.celu(x, alpha),
    "quantized.leaky_relu": lambda x, slope, inplace, scale, zero_point: F.leaky_relu(x, slope),
    "quantized.sigmoid": lambda x, scale, zero_point: torch.sigmoid(x),
    "quantized.softmax": lambda x, dim, scale, zero_point: torch.softmax(x, dim),
    "quantized.relu6": lambda x, inplace=False: F.relu6(x),
    "quantized.clamp": lambda x, low=None, high=None: torch.clamp(x, low, high),
    "quantized.threshold": lambda x, threshold, value: F.threshold(x, threshold, value),
    "quantized.cat": lambda tensors, dim, scale=None, zero_point=None: torch.cat(tensors, dim),
    "quantized.layer_norm": lambda x, shape, weight, bias, eps, scale, zero_point:
        F.layer_norm(x, shape, weight, bias, eps),
    "quantized.group_norm": lambda x, groups, weight, bias, eps, scale, zero_point:
        F.group_norm(x, groups, weight, bias, eps),
    "quantized.instance_norm": lambda x, weight, bias, eps, scale, zero_point:
        F.instance_norm(x, weight=weight, bias=bias, eps=eps),
    **{f"quantized.batch_norm{d}d": lambda x, weight, bias, mean, var, eps, scale, zero_point:
        F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps) for d in (1, 2, 3)},
}


def class_path(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


class _Call(nn.Module):
    """`function(*args, **kwargs)` with the tensors of the arguments as forward's inputs (the module, when
    there is one, is registered so its parameters are exported as initializers)."""

    def __init__(self, function: Callable[..., Any], arguments: Any, slots: list[bool], module: nn.Module | None):
        super().__init__()
        self.function, self.arguments, self.slots, self.module = function, arguments, slots, module

    def forward(self, *tensors: torch.Tensor) -> Any:
        leaves, spec = pytree.tree_flatten(self.arguments)
        feed = iter(tensors)
        args, kwargs = pytree.tree_unflatten([next(feed) if slot else leaf for leaf, slot in zip(leaves, self.slots)],
                                             spec)
        return (self.module if self.module is not None else self.function)(*args, **kwargs)


def splice_float_call(g: OnnxGraph, where: str, function: Callable[..., Any], arguments: tuple[tuple, dict],
                      inputs: list[tuple[str, torch.Tensor]], dynamic_batch: bool, module: nn.Module | None = None
                      ) -> list[str]:
    """Trace `function(*args, **kwargs)` with torch.onnx.export and add its nodes to `g`.

    `arguments` holds the call's arguments with a `SLOT` where each of `inputs` goes: (ONNX tensor name,
    example float tensor). Returns the ONNX names of the call's output tensors, in pytree order.
    """
    leaves, _ = pytree.tree_flatten(arguments)
    slots = [leaf is SLOT for leaf in leaves]
    call = _Call(function, arguments, slots, module).eval()
    examples = tuple(tensor for _, tensor in inputs)
    with torch.no_grad():
        outputs, _ = pytree.tree_flatten(call(*examples))
    input_names = [f"in_{i}" for i in range(len(inputs))]
    output_names = [f"out_{i}" for i in range(len(outputs))]
    dynamic_axes = {name: {0: "batch"} for name, tensor in zip(input_names + output_names, [*examples, *outputs])
                    if tensor.dim() > 0} if dynamic_batch else None
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            warnings.simplefilter("error", torch.jit.TracerWarning)
            torch.onnx.export(call, examples, buffer, dynamo=False, opset_version=OPSET, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    except torch.jit.TracerWarning as warning:
        raise ExportError(f"{where}: runs Python code that a trace cannot follow ({str(warning).splitlines()[0]}); "
                          "the ONNX graph would hold only the branch the example inputs took. Rewrite it without "
                          "data-dependent control flow, or keep it out of the exported model") from None
    except Exception as error:
        raise ExportError(f"{where}: torch.onnx.export cannot export it ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); make it traceable with plain "
                          "tensor ops, or keep it out of the exported model") from error
    return _splice(g, where, g.onnx.load_from_string(buffer.getvalue()), [name for name, _ in inputs],
                   output_names)


SLOT = object()  # marks where an input tensor goes in a call's arguments


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
