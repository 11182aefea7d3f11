"""Residual adds that read a conv directly: one int8 kernel for both, so the conv's output is never rounded.

torch.ao's native FX flow quantizes a conv's output and then the residual add's output: every
inverted-residual block of MobileNetV2 rounds its projection conv to 8 bits only to add it to the
block's input and round again. onednn has a kernel that adds a quantized tensor to the conv's
accumulator before the one requantization (`quantized::conv2d_add`, torch.ao's `ConvAdd2d`). Measured
on ImageNet MobileNetV2 (AMD EPYC, x86 without VNNI): skipping those 10 roundings in the float
simulation raised logits SQNR from 19.3 to 19.8 dB before any weight refit; with the refit, the int8
model went from 19.3 to 20.0 dB (and from 19.7 to 20.5 dB with VNNI). A ResNet block's add + ReLU fuses
the same way (conv2d_add_relu).

The fusion has to be the same in the float simulation the recovery passes correct (so they see the
error the int8 model will make) and in the int8 model, and only engines with the kernel can run it;
`fusable_convs` names the layers, once, on the float graph, and the two rewrites below apply it.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Iterable

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fxq.backend.op_kinds import is_shape_op
from fxq.frontend.graph import only_user, replace_module

# Engines whose int8 conv2d_add kernel exists (fbgemm and x86 would run a packed weight they cannot add to).
FUSING_ENGINES = frozenset({"onednn"})
_FLOAT_ADDS = (operator.add, torch.add)


def fusable_convs(gm: fx.GraphModule, example_inputs: tuple) -> frozenset[str]:
    """Plain Conv2d layers of the float graph (BatchNorm folded, no fused clamp) whose output is read
    only by a two-tensor add of the same shape (and that are called once): the layers whose output the
    int8 model can add in-kernel. Where both inputs of an add are such convs (a ResNet block with a
    downsample), the later one is taken."""
    ShapeProp(gm).propagate(*example_inputs)  # writes node.meta["tensor_meta"]; the graph is fxq's own copy
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    calls = Counter(str(node.target) for node in gm.graph.nodes if node.op == "call_module")
    names = set()
    for add in gm.graph.nodes:
        if add.op != "call_function" or add.target not in _FLOAT_ADDS or add.kwargs or len(add.args) != 2 \
                or not all(isinstance(arg, fx.Node) for arg in add.args) or add.args[0] is add.args[1]:
            continue
        shapes = [getattr(arg.meta.get("tensor_meta"), "shape", None) for arg in add.args]
        if shapes[0] is None or shapes[0] != shapes[1]:
            continue
        convs = [arg for arg in add.args if arg.op == "call_module" and len(arg.users) == 1
                 and calls[str(arg.target)] == 1 and type(gm.get_submodule(str(arg.target))) is nn.Conv2d]
        if convs:
            conv = max(convs, key=order.__getitem__)
            other = add.args[1] if add.args[0] is conv else add.args[0]
            if _residual_can_be_overwritten(gm, other, add, order):
                names.add(str(conv.target))
    return frozenset(names)


def _residual_can_be_overwritten(gm: fx.GraphModule, other: fx.Node, add: fx.Node,
                                 order: dict[fx.Node, int]) -> bool:
    """Whether the fused kernel may write its output over the residual tensor, as onednn does (its sum
    post-op accumulates in place; measured: a ResNet block's skip tensor came back holding the block's
    output, on the output's scale). It may when nothing reads the residual after the add and it is a
    tensor of its own: not a graph input, a constant, or a view of a tensor others read."""
    if other.op not in ("call_module", "call_function", "call_method") or is_shape_op(gm, other):
        return False
    return not _read_after(other, add, order)


def _read_after(value: fx.Node, add: fx.Node, order: dict[fx.Node, int]) -> bool:
    return any(order[user] > order[add] for user in value.users if user is not add)


def skip_output_rounding(simulation: fx.GraphModule, names: Iterable[str]) -> list[str]:
    """In torch.ao's reference model, feed each named conv's float output straight to its add.

    The reference model rounds the conv (quantize, dequantize) before the add; without that pair it
    computes what `fuse_into_adds` makes the int8 model compute. Returns the layers rewritten.
    """
    import torch.ao.nn.quantized.reference as nnqr

    names, done = set(names), []
    for node in list(simulation.graph.nodes):
        if node.op != "call_module" or str(node.target) not in names \
                or type(simulation.get_submodule(str(node.target))) is not nnqr.Conv2d:
            continue  # kept float, the int8 model cannot fuse it either
        quantize = only_user(node)
        if quantize is None or quantize.target is not torch.quantize_per_tensor:
            continue
        dequantize = only_user(quantize)
        if dequantize is None or dequantize.target != "dequantize":
            continue
        add = only_user(dequantize)
        if add is None or add.op != "call_function" or add.target not in _FLOAT_ADDS:
            continue
        add.replace_input_with(dequantize, node)
        simulation.graph.erase_node(dequantize)
        scale, zero_point = quantize.args[1:3]
        simulation.graph.erase_node(quantize)
        for attribute in (scale, zero_point):
            if isinstance(attribute, fx.Node) and not attribute.users:
                simulation.graph.erase_node(attribute)
        done.append(str(node.target))
    simulation.graph.lint()
    simulation.recompile()
    return done


def fuse_into_adds(quantized: fx.GraphModule, names: Iterable[str]) -> list[str]:
    """Replace each named int8 Conv2d and the int8 add (or add + ReLU) that reads it by one `ConvAdd2d`
    (`ConvAddReLU2d`): quantized::conv2d_add (conv2d_add_relu).

    The fused module keeps the conv's name and int8 weights and takes the add's output scale and zero
    point; it may write its output into the residual tensor, which nothing reads afterwards. Call under
    the engine the model runs on (the weights are packed for it). Returns the layers fused.
    """
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    names, done = set(names), []
    for node in list(quantized.graph.nodes):
        if node.op != "call_module" or str(node.target) not in names:
            continue
        conv = quantized.get_submodule(str(node.target))
        add = only_user(node)
        kinds = {torch.ops.quantized.add: nniq.ConvAdd2d, torch.ops.quantized.add_relu: nniq.ConvAddReLU2d}
        if type(conv) is not nnq.Conv2d or add is None or add.op != "call_function" or add.target not in kinds \
                or len(add.args) != 4 or add.kwargs:
            continue
        first, second, scale, zero_point = add.args
        other = second if first is node else first
        order = {node: index for index, node in enumerate(quantized.graph.nodes)}  # fusing inserts nodes
        if not isinstance(other, fx.Node) or other is node or _read_after(other, add, order):
            continue  # the kernel would overwrite it (see _residual_can_be_overwritten)
        scale, zero_point = float(_value(quantized, scale)), int(_value(quantized, zero_point))
        if add.target is torch.ops.quantized.add_relu and zero_point != 0:
            continue  # the fused ReLU clips at the real 0, which a ReLU's observed range puts at code 0
        fused = kinds[add.target](conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                                  bias=conv.bias() is not None, padding_mode=conv.padding_mode)
        fused.set_weight_bias(conv.weight(), conv.bias())
        fused.scale, fused.zero_point = scale, zero_point
        replace_module(quantized, str(node.target), fused)
        with quantized.graph.inserting_after(add):
            call = quantized.graph.call_module(str(node.target), (node.args[0], other))
        add.replace_all_uses_with(call)
        quantized.graph.erase_node(add)
        quantized.graph.erase_node(node)
        done.append(str(node.target))
    quantized.graph.eliminate_dead_code()
    quantized.graph.lint()
    quantized.recompile()
    return done


def _value(gm: fx.GraphModule, arg: object) -> object:
    """A converted add's scale or zero point: a constant, or a buffer the graph reads by get_attr."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = getattr(gm, str(arg.target))
        return float(value) if isinstance(value, torch.Tensor) else value
    return arg


def is_conv_add(module: nn.Module, relu: bool | None = None) -> bool:
    """Whether `module` is an int8 conv that also adds a residual (`fuse_into_adds`); with `relu`, one
    that also applies (True) or does not apply (False) a ReLU after the add."""
    import torch.ao.nn.intrinsic.quantized as nniq

    kinds = {None: (nniq.ConvAdd2d, nniq.ConvAddReLU2d), True: nniq.ConvAddReLU2d, False: nniq.ConvAdd2d}
    return isinstance(module, kinds[relu])


def fused_layers(quantized: nn.Module) -> list[str]:
    """Names of the int8 model's convs that run with their residual add (`fuse_into_adds`)."""
    return [name for name, module in quantized.named_modules() if is_conv_add(module)]
