"""What kind of op a graph node or module is, as torch.ao's FX flow sees it: int8 kernel, shape-only op,
conv/linear layer (float or int8), and how many quantize/dequantize calls an int8 graph makes.

Kept apart from the engine so that the front end's planners and `conv_add` can classify ops without
importing the code that drives prepare and convert.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch
import torch.ao.nn.intrinsic as nni
from torch import fx, nn

# Transposed convs run in float: torch.ao's prepare refuses per-channel weight observers for them
# (YOLOv8n-seg's mask prototype upsampling raised its AssertionError); counted as float layers.
TRANSPOSED_CONV_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
WEIGHT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, *TRANSPOSED_CONV_TYPES)
# fxq's own dynamic int8 Linear (backend/dynamic_linear.py), by module path: op_kinds sits below it
DYNAMIC_LINEAR_MODULE = "fxq.backend.dynamic_linear"
# and its Linears that read one tensor, run as one kernel (backend/shared_input.py): each member counts as a
# dynamic int8 layer, their stacked kernel (a SharedInputGroup) as none
SHARED_INPUT_MODULE = "fxq.backend.shared_input"
_INT8_MODULE_PREFIXES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", DYNAMIC_LINEAR_MODULE,
                         SHARED_INPUT_MODULE)
RECURRENT_TYPES = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
DYNAMIC_TYPES = (nn.Linear, *RECURRENT_TYPES)


def fused_clamp_class(layer: nn.Module) -> type[nn.Module] | None:
    """The float container that holds `layer` and the Clamp fused after it, or None if it cannot fuse."""
    table = {nn.Conv1d: nni.ConvReLU1d, nn.Conv2d: nni.ConvReLU2d, nn.Conv3d: nni.ConvReLU3d,
             nn.Linear: nni.LinearReLU}
    return table.get(type(layer))


@functools.lru_cache(maxsize=1)
def _int8_patterns() -> tuple[frozenset, frozenset, frozenset]:
    """(module types, functions, method names) that torch.ao's FX flow lowers to an int8 op on its own.

    Read from the backend config `prepare_fx` uses by default (native), single-op patterns only; ops
    it merely passes through unobserved (size, shape) are left out.
    """
    from torch.ao.quantization.backend_config import ObservationType, get_native_backend_config

    modules, functions, methods = set(), set(), set()
    for pattern_config in get_native_backend_config().configs:
        pattern = pattern_config.pattern
        if pattern is None or isinstance(pattern, tuple) \
                or pattern_config.observation_type is ObservationType.INPUT_OUTPUT_NOT_OBSERVED:
            continue
        (modules if isinstance(pattern, type) else methods if isinstance(pattern, str) else functions).add(pattern)
    return frozenset(modules), frozenset(functions), frozenset(methods)


def quantizes_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when torch.ao would run `node` as an int8 op (with quantize/dequantize at float neighbours)
    under a global static qconfig; False for ops that have no int8 kernel and stay float."""
    modules, functions, methods = _int8_patterns()
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))) in modules
    if node.op == "call_function":
        try:
            return node.target in functions
        except TypeError:  # unhashable callables
            return False
    if node.op == "call_method":
        return node.target in methods
    return False


_SHAPE_METHODS = frozenset({"size", "dim", "view", "reshape", "flatten", "permute", "transpose", "squeeze",
                            "unsqueeze", "contiguous", "expand", "expand_as", "chunk", "split", "unbind", "t",
                            "view_as", "reshape_as", "unflatten", "movedim", "shape", "numel", "detach", "to",
                            "type_as", "float"})


def is_shape_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that only read or rearrange shapes (or return their input) and never run a numeric kernel."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function":
        return node.target in (operator.getitem, getattr, torch.flatten, torch.reshape, torch.transpose,
                               torch.permute, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split,
                               torch.unbind, torch.narrow, len, torch.nn.functional.dropout) \
            or getattr(node.target, "__module__", None) == "_operator" and node.target.__name__ in (
                "floordiv", "mul", "add", "sub") and not any(isinstance(a, fx.Node) and a.op != "call_method"
                                                              for a in node.args)
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), (nn.Identity, nn.Dropout, nn.Flatten, nn.Unflatten))
    return False


def count_conversions(quantized: fx.GraphModule) -> dict[str, int]:
    """Quantize and dequantize calls in one forward of a converted int8 graph."""
    counts = {"quantize": 0, "dequantize": 0}
    for node in quantized.graph.nodes:
        if node.op == "call_function" and node.target in (torch.quantize_per_tensor,
                                                          torch.quantize_per_tensor_dynamic):
            counts["quantize"] += 1
        elif (node.op == "call_method" and node.target == "dequantize") or \
                (node.op == "call_function" and node.target is torch.dequantize):
            counts["dequantize"] += 1
    return counts


def is_quantized_module(module: nn.Module) -> bool:
    """True for modules that run an int8 kernel (static or dynamic)."""
    return type(module).__module__.startswith(_INT8_MODULE_PREFIXES)


def is_dynamic_quantized_module(module: nn.Module) -> bool:
    """True for dynamic int8 modules: float input, quantized on each call's own range, float output."""
    return type(module).__module__.startswith(("torch.ao.nn.quantized.dynamic", DYNAMIC_LINEAR_MODULE,
                                               SHARED_INPUT_MODULE))


def is_weighted_quantized_module(module: nn.Module) -> bool:
    return is_quantized_module(module) and hasattr(module, "weight") and callable(getattr(module, "weight"))


def _type_path(module: nn.Module) -> str:
    """Dotted class path of a module; for TorchScript modules (fxq.load) the path of the scripted class."""
    if isinstance(module, torch.jit.ScriptModule):
        return module._c._type().qualified_name().removeprefix("__torch__.")
    return f"{type(module).__module__}.{type(module).__qualname__}"


_FLOAT_WEIGHT_PATHS = {f"{t.__module__}.{t.__qualname__}" for t in WEIGHT_TYPES}


@dataclass
class WeightedLayers:
    """Conv and linear calls of an int8 model, by whether they run an int8 kernel."""

    int8: list[str]
    float: list[str]

    @property
    def int8_fraction(self) -> float:
        total = len(self.int8) + len(self.float)
        return len(self.int8) / total if total else float("nan")


_INT8_WEIGHTED_OPS = ("quantized.linear", "quantized.conv", "quantized.linear_dynamic")
_FLOAT_WEIGHTED_FUNCTIONS = {torch.nn.functional.linear, torch.nn.functional.conv1d, torch.nn.functional.conv2d,
                             torch.nn.functional.conv3d, torch.conv2d, torch.conv1d, torch.conv3d}


def is_weighted_module(module: nn.Module) -> bool:
    """A float conv or linear, or a fused conv/linear + activation container (torch.ao.nn.intrinsic)."""
    return isinstance(module, WEIGHT_TYPES) or (type(module).__module__.startswith("torch.ao.nn.intrinsic")
                                                and isinstance(next(module.children(), None), WEIGHT_TYPES))


def weighted_layers(quantized_model: nn.Module) -> WeightedLayers:
    """Every conv / linear call of the model: module calls, functional calls with packed int8 weights, and
    the conv / linear modules inside submodules that run as opaque float code (untraceable leaves), and in
    a model quantized region by region, those of its float code around the regions.

    Counted over graph nodes when the model is an fx.GraphModule (a module called twice counts twice), over
    modules otherwise (a model loaded with fxq.load).
    """
    int8, floating = [], []
    graphs = [(name, m) for name, m in quantized_model.named_modules() if isinstance(m, torch.fx.GraphModule)]
    if not graphs:
        for name, module in quantized_model.named_modules():
            path = _type_path(module)
            if path.startswith(_INT8_MODULE_PREFIXES) and _is_weighted_int8(module):
                int8.append(name)
            elif path in _FLOAT_WEIGHT_PATHS:
                floating.append(name)
        return WeightedLayers(int8, floating)
    inside_graphs = {name for name, _ in graphs}
    for prefix, gm in graphs:
        scope = f"{prefix}." if prefix else ""
        for node in gm.graph.nodes:
            if node.op == "call_module":
                if f"{scope}{node.target}" in inside_graphs:
                    continue  # a nested graph: its own nodes are counted
                module = gm.get_submodule(str(node.target))
                name = f"{scope}{node.target}"
                if _is_weighted_int8(module):
                    int8.append(name)
                elif is_weighted_module(module):
                    floating.append(name)  # a conv/linear, or a fused conv+activation container, in float
                else:  # an opaque submodule: every conv / linear inside runs in float
                    floating += [f"{name}.{inner}" if inner else name for inner, m in module.named_modules()
                                 if isinstance(m, WEIGHT_TYPES)]
            elif node.op == "call_function":
                target = str(node.target)
                if any(op in target for op in _INT8_WEIGHTED_OPS) and "prepack" not in target \
                        and "unpack" not in target:
                    int8.append(f"{scope}{node.name}")
                elif node.target in _FLOAT_WEIGHTED_FUNCTIONS:
                    floating.append(f"{scope}{node.name}")
    if "" not in inside_graphs:  # a model quantized region by region: its float code around the graphs
        in_graph = tuple(f"{name}." for name in inside_graphs)
        floating += [name for name, module in quantized_model.named_modules()
                     if isinstance(module, WEIGHT_TYPES) and name not in inside_graphs
                     and not name.startswith(in_graph) and name not in floating]
    return WeightedLayers(int8, floating)


def _is_weighted_int8(module: nn.Module) -> bool:
    path = _type_path(module)
    return path.startswith(_INT8_MODULE_PREFIXES) and not path.endswith(("PackedParams", "SharedInputGroup")) \
        and callable(getattr(module, "weight", None))


