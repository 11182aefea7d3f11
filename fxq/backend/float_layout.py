"""Float layers left in an int8 model run fast: convs channels-last, their clamps in place.

The int8 kernels (onednn, fbgemm) work in channels-last (NHWC) and hand back NHWC tensors; a float conv
with a contiguous (NCHW) weight is run by oneDNN in the input's layout, or reordered. Given a
channels-last weight, PyTorch runs the conv channels-last whatever the input, and the ops after it stay
there. On ImageNet MobileNetV2 with 28 layers kept float for target_sqnr_db=30, batch-1 latency went
from 0.79 to 0.64 of the float model's (AMD EPYC, 2 threads); the outputs are the same up to float
summation order.

Only convs that fxq's own graphs call are changed, never a user module fxq could not trace (its code
may `view` the weight), and the change is undone if the model then fails on the example inputs or
returns tensors in another layout, since a `view` downstream of a conv depends on the layout.

The clamp (ReLU/ReLU6) fused after a float conv or linear then works on the layer's output in place, as
torchvision's own `ReLU6(inplace=True)` does in the float model; the layer's output is read by nothing
else. Writing a fresh tensor instead cost 4.1 against 0.5 ms for conv + clamp at 96x112x112 in a loop,
and on MobileNetV2 with 11 blocks float (target_sqnr_db=30) 0.70 against 0.60 of float latency.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx, nn

from fxq.backend.op_kinds import fused_clamp_class
from fxq.frontend.rewrite import unwrap


def _float_conv2d(module: nn.Module) -> nn.Conv2d | None:
    """The float 2-D conv that `module` runs: itself, or the conv inside a float conv + activation."""
    import torch.ao.nn.intrinsic as nni  # float fused containers: ConvReLU2d keeps its conv at [0]

    if type(module) is nn.Conv2d:
        return module
    if isinstance(module, nni._FusedModule) and type(module[0]) is nn.Conv2d:
        return module[0]
    return None


def _modules_called_by_graphs(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: module} of the modules called by a call_module node of an fx graph in `model`."""
    found: dict[str, nn.Module] = {}
    for prefix, graph_module in model.named_modules():
        if not isinstance(graph_module, fx.GraphModule):
            continue
        for node in graph_module.graph.nodes:
            if node.op == "call_module":
                name = f"{prefix}.{node.target}" if prefix else str(node.target)
                found[name] = graph_module.get_submodule(str(node.target))
    return found


def float_convs_called_by_graphs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """{qualified name: conv} of the float 2-D convs called by a call_module node of an fx graph in `model`."""
    called = ((name, _float_conv2d(module)) for name, module in _modules_called_by_graphs(model).items())
    return {name: conv for name, conv in called if conv is not None}


def clamp_float_layer_outputs_in_place(model: nn.Module) -> None:
    """Set `inplace` on the Clamp of each float layer + clamp container (frontend.rewrite) fxq's graphs call.

    Inside the container the clamp reads only the layer's fresh output.
    """
    for module in _modules_called_by_graphs(model).values():
        layer, clamp = unwrap(module)
        if clamp is not None and type(module) is fused_clamp_class(layer):
            clamp.inplace = True


@torch.no_grad()
def run_float_convs_channels_last(model: nn.Module, run: Callable[[nn.Module], list[torch.Tensor]]) -> str:
    """Give the float convs fxq's graphs call channels-last weights, in place.

    `run(model)` returns the model's output tensors on the example inputs. Returns why the weights were
    put back ("" when they were not): the model fails, or its outputs change layout, with the new ones.
    """
    convs = [conv for conv in float_convs_called_by_graphs(model).values()
             if conv.weight.dim() == 4 and not conv.weight.is_contiguous(memory_format=torch.channels_last)]
    if not convs:
        return ""
    before = [output.stride() for output in run(model)]
    originals = [conv.weight.data for conv in convs]
    for conv in convs:
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    try:
        after = [output.stride() for output in run(model)]
        problem = "" if after == before else "the model's outputs would change memory layout"
    except Exception as error:  # a layout-dependent op (view) downstream: keep NCHW, say so
        problem = f"the model fails with them ({type(error).__name__}: {error})"
    if problem:
        for conv, weight in zip(convs, originals):
            conv.weight.data = weight
        return f"{len(convs)} float conv(s) kept in NCHW layout: with channels-last weights {problem}"
    return ""
