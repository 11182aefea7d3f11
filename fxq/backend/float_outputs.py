"""Linear layers whose output the model returns run as dynamic int8 kernels: int8 weights, float output.

A static int8 linear rounds its output to 8 bits on the range seen in calibration, and the model
dequantizes it at once to return it: that rounding buys nothing, and where an input brings logits beyond
the calibrated range they are clipped. Its input, a pooled vector with one value per channel and image,
is the activation calibration bounds worst (on random-weight EfficientNet-B0, the squeeze-excitation
inputs of 32 eval crops reached 4.66 where 32 calibration crops had reached 2.5). torch.ao's dynamic
linear (`quantized::linear_dynamic`) quantizes its input on the range of each call and returns float, on
the same int8 GEMM; the int8 weights (already rounded and refit) move over unchanged.

Measured at 2 threads on an AMD EPYC (Zen 4, AVX-512 VNNI), `python bench/generalization.py` and
`python bench/probe.py`: logits SQNR of random-weight ResNet-18 27.83 -> 28.72 dB, ResNet-50 14.86 ->
15.62, ImageNet MobileNetV2 20.98 -> 21.05 (target_sqnr_db=30 then kept 18 layers float instead of 24).

The price: the input's range now depends on the batch, so a sample's logits differ slightly between a
batch-1 call and a batch-32 call (the input is rounded on another grid).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.ao.nn.quantized as nnq
from torch import fx

from fxq.backend.dynamic_linear import DynamicLinear
from fxq.backend.engine import using_engine
from fxq.frontend.graph import only_user, replace_module


def _returned_linears(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """(linear node, its dequantize node) for each static int8 Linear whose output is only dequantized and
    returned (a module called once)."""
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or type(gm.get_submodule(node.target)) is not nnq.Linear:
            continue
        dequantize = only_user(node)
        if dequantize is None or dequantize.op != "call_method" or dequantize.target != "dequantize":
            continue
        if dequantize.users and all(user.op == "output" for user in dequantize.users):
            found.append((node, dequantize))
    return found


def dynamic_output_linears(gm: fx.GraphModule, engine: str, reduce_range: bool) -> list[str]:
    """Rewrite `gm` in place: each returned static int8 Linear becomes a dynamic one reading the float
    value its input was quantized from (or that input dequantized), on 7-bit inputs only if
    `reduce_range` (EngineChoice.dynamic_reduce_range). Returns the layers rewritten."""
    rewritten = []
    for linear, dequantize in _returned_linears(gm):
        static = gm.get_submodule(linear.target)
        weight = static.weight()
        with using_engine(engine):
            dynamic = DynamicLinear(weight.shape[1], weight.shape[0], static.bias() is not None,
                                    reduce_range=reduce_range)
            dynamic.set_weight_bias(weight, static.bias())
        source = linear.args[0]
        quantize_node = source if isinstance(source, fx.Node) and source.op == "call_function" \
            and source.target is torch.quantize_per_tensor and len(source.users) == 1 else None
        with gm.graph.inserting_before(linear):
            float_input = quantize_node.args[0] if quantize_node is not None \
                else gm.graph.call_method("dequantize", (source,))
        linear.args = (float_input,) + tuple(linear.args[1:])
        dequantize.replace_all_uses_with(linear)
        gm.graph.erase_node(dequantize)
        if quantize_node is not None and not quantize_node.users:
            gm.graph.erase_node(quantize_node)
        replace_module(gm, str(linear.target), dynamic)
        rewritten.append(str(linear.target))
    if rewritten:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return rewritten
