"""What keeping a block of layers float costs in latency: the float-island cost model's estimate, with each
conv and linear layer's float and int8 times measured on this machine.

The sensitivity analyzer ranks the blocks `recommend` may keep float by solo noise per microsecond of
this cost, so that a target SQNR is met with a fast model.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

from torch import fx, nn

from fxq.backend.engine import using_engine
from fxq.backend.float_layout import run_float_convs_channels_last
from fxq.backend.op_kinds import is_quantized_module, quantizes_op
from fxq.calibration import Batch, output_tensors
from fxq.config import key_covers
from fxq.frontend.islands import find_float_islands
from fxq.frontend.rewrite import unwrap
from fxq.report.latency import module_times_us
from fxq.validate import run_example


def float_unit_costs(float_graph: fx.GraphModule, example_inputs: Batch, unit_names: Iterable[str], engine: str,
                     keep_float: Iterable[Any] = (), int8_model: nn.Module | None = None) -> dict[str, float]:
    """Estimated latency (us, on the example inputs) that keeping each named module float adds to the int8 model.

    The estimate is the float-island cost model's (fxq.frontend.islands), planned as `fxq.quantize`
    plans it: once with the user's `keep_float` modules float, once more with each unit float too, so a
    unit's cost includes the quantize and dequantize at its edges and any island the planner then moves.
    Given the all-int8 model, the conv and linear layers' own times are measured on this machine, in
    float and in int8 on the example inputs (`measured_layer_times`), in place of the cost table's
    (measured on another machine and engine; the table was off by 2x on some layers, see
    docs/design/mixed-precision.md). Timings vary from run to run, so two runs may rank blocks of
    similar cost differently and keep different ones float; whatever is kept is verified against the
    target.
    """
    measured = measured_layer_times(float_graph, int8_model, example_inputs, engine) if int8_model is not None \
        else None
    forced = [name for name, module in float_graph.named_modules() if name and key_covers(keep_float, name, module)]
    base = find_float_islands(float_graph, example_inputs, quantizes_op, engine, forced, measured)
    costs = {}
    for name in unit_names:
        plan = find_float_islands(float_graph, example_inputs, quantizes_op, engine, forced + [name], measured)
        # planned_us leaves out the ops forced float; their float time is what the all-float total lost
        costs[name] = plan.planned_us + (base.float_us - plan.float_us) - base.planned_us
    return costs


def measured_layer_times(float_graph: fx.GraphModule, int8_model: nn.Module, example_inputs: Batch,
                         engine: str) -> dict[str, tuple[float, float]]:
    """(float us, int8 us) on the example inputs of each conv / linear module that both graphs call by the
    same name and that runs int8 in `int8_model` (not one it keeps float).

    The float layers are timed channels-last where the graph allows it, as they run inside an int8 model
    (backend.float_layout.run_float_convs_channels_last), and the int8 model on freshly packed weights (a
    packed weight that has seen another batch size rebuilds its kernel on every call:
    backend.engine.repack_weights). Known approximation: where onednn runs a conv and its residual add as
    one kernel (backend.conv_add), the measured int8 time covers the add, which the cost table prices
    again, so such a block's float cost comes out low by the table's int8 add (~30 us at 24x56x56).
    """
    int8_modules = {str(node.target): int8_model.get_submodule(str(node.target))
                    for node in getattr(int8_model, "graph", fx.Graph()).nodes if node.op == "call_module"}
    names = [str(node.target) for node in float_graph.graph.nodes if node.op == "call_module"
             and is_quantized_module(int8_modules.get(str(node.target)))
             and unwrap(float_graph.get_submodule(str(node.target)))[0] is not None]
    if not names:
        return {}
    float_copy = copy.deepcopy(float_graph)
    run_float_convs_channels_last(float_copy, lambda model: output_tensors(run_example(model, example_inputs)))
    float_us = module_times_us(float_copy, example_inputs, names)
    with using_engine(engine):
        int8_us = module_times_us(copy.deepcopy(int8_model), example_inputs, names)
    return {name: (float_us[name], int8_us[name]) for name in names}
