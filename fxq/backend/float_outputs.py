"""Linear layers with no int8 neighbour run as dynamic int8 kernels: int8 weights, float input and output.

A static int8 Linear whose output is dequantized at once and either returned or computed from an input
quantized from float only for it gains little from its static grids: the quantize and dequantize are paid either way. What the
static grids cost: the input is clipped to the range seen in calibration, on one range for all inputs,
and the output is rounded to 8 bits. Such a layer is the classifier head whose output the model returns
(its input, a pooled vector, is the activation calibration bounds worst: on random-weight EfficientNet-B0
the squeeze-excitation inputs of 32 eval crops reached 4.66 where 32 calibration crops had reached 2.5),
and every Linear of a transformer whose LayerNorm, GELU and softmax run in float (BERT's residual stream
has outlier channels that a calibrated per-tensor range serves badly). torch.ao's dynamic linear
(`quantized::linear_dynamic`) quantizes its input on the range of each call and returns float, on the
same int8 GEMM; the int8 weights (already rounded and refit) move over unchanged, and smoothing
(recovery/smoothing.py) can then be applied per layer.

Measured at 2 threads on an AMD EPYC (Zen 4, AVX-512 VNNI), `python bench/generalization.py` and
`python bench/probe.py` (returned heads only): logits SQNR of random-weight ResNet-18 27.83 -> 28.72 dB,
ResNet-50 14.86 -> 15.62, ImageNet MobileNetV2 20.98 -> 21.05 (target_sqnr_db=30 then kept 18 layers
float instead of 24). On the reference machine's x86 kernels a dynamic 384->1536 Linear on 64 tokens took
93 us against 101 us for quantize + static linear + dequantize.

The price: the input's range now depends on the batch, so a sample's output differs slightly between a
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


def _isolated_linears(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node | None]]:
    """(linear node, its dequantize node, the quantize node made for it alone or None) for each static int8
    Linear (a module called once) whose output is only dequantized, and either returned or computed from an
    input quantized from float for it alone."""
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or type(gm.get_submodule(node.target)) is not nnq.Linear:
            continue
        dequantize = only_user(node)
        if dequantize is None or dequantize.op != "call_method" or dequantize.target != "dequantize":
            continue
        source = node.args[0]
        quantize_node = source if isinstance(source, fx.Node) and source.op == "call_function" \
            and source.target is torch.quantize_per_tensor and len(source.users) == 1 else None
        returned = all(user.op == "output" for user in dequantize.users)
        if dequantize.users and (quantize_node is not None or returned):
            found.append((node, dequantize, quantize_node))
    return found


def dynamic_output_linears(gm: fx.GraphModule, engine: str, reduce_range: bool) -> list[str]:
    """Rewrite `gm` in place: each isolated static int8 Linear becomes a dynamic one reading the float
    value its input was quantized from (or that input dequantized), on 7-bit inputs only if `reduce_range`
    (EngineChoice.dynamic_reduce_range). Returns the layers rewritten."""
    rewritten = []
    for linear, dequantize, quantize_node in _isolated_linears(gm):
        with using_engine(engine):
            dynamic = DynamicLinear.from_int8(gm.get_submodule(linear.target), reduce_range)
        with gm.graph.inserting_before(linear):
            float_input = quantize_node.args[0] if quantize_node is not None \
                else gm.graph.call_method("dequantize", (linear.args[0],))
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
