"""Accuracy-targeted mixed precision: the fewest layers in float that reach a target.

The target is an output SQNR (`target_sqnr_db`) or the user's own metric (`eval_fn` + `max_drop`: the
int8 model may score at most `max_drop` below the float model). Both are guided by the sensitivity
analyzer: blocks ranked by solo noise per microsecond that keeping them float costs, their layers timed
on this machine (see `float_units` and `float_unit_costs`), then verified end to end; the layers kept in
float, what was reached and the attempts go into the quantized model's summary and report.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Sequence

from torch import fx, nn

from fxq.backend.engine import quantizes_op
from fxq.calibration import Batch
from fxq.config import key_covers, with_float
from fxq.frontend.islands import find_float_islands
from fxq.summary import summary_of


def float_unit_costs(float_graph: fx.GraphModule, example_inputs: Batch, unit_names: Iterable[str], engine: str,
                     keep_float: Iterable[Any] = (), int8_model: nn.Module | None = None) -> dict[str, float]:
    """Estimated latency (us, on the example inputs) that keeping each named module float adds to the int8 model.

    The estimate is the float-island cost model's (fxq.frontend.islands), planned as `fxq.quantize`
    plans it: once with the user's `keep_float` modules float, once more with each unit float too, so a
    unit's cost includes the quantize and dequantize at its edges and any island the planner then moves.
    Given the all-int8 model, the conv and linear layers' own times are measured on this machine, in
    float and in int8 on the example inputs (`measured_layer_times`), in place of the cost table's
    (measured on another machine and engine): on ImageNet MobileNetV2 under the AVX2 kernels (Intel
    Xeon, onednn) the table put features.1 (at 112x112) at ~550 us and features.4 at ~455 us, the measured layer times at ~215
    and ~246 us, and whole models timed with and without each of them float (beside the other blocks
    target_sqnr_db=30 keeps float) differed by ~0 and ~290 us. With the measured times, 30 dB took 9
    blocks (22 layers) instead of 10 (25), at 0.59 of float latency instead of 0.60. Timings vary from
    run to run, so two runs may rank blocks of similar cost differently and keep different ones float;
    whatever is kept is verified against the target.
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
    from fxq.analysis.shadow import output_tensors
    from fxq.backend.engine import is_quantized_module, using_engine
    from fxq.backend.float_layout import run_float_convs_channels_last
    from fxq.frontend.rewrite import unwrap
    from fxq.report.latency import module_times_us
    from fxq.validate import run_example

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


# One calibration batch in this many (at least one) is held out to verify a target_sqnr_db choice.
HELD_OUT_EVERY = 4


def held_out_split(batches: Sequence[Batch]) -> tuple[list[Batch], list[Batch]]:
    """(batches to calibrate on, batches to verify on): the last quarter is held out when there are at
    least two batches; with one, the choice can only be checked on the calibration batch itself."""
    batches = list(batches)
    if len(batches) < 2:
        return batches, batches
    held = max(1, len(batches) // HELD_OUT_EVERY)
    return batches[:-held], batches[-held:]


def quantize_to_target(model: nn.Module, example_inputs: Batch, batches: Sequence[Batch],
                       target_sqnr_db: float, quantize_options: dict[str, Any]) -> nn.Module:
    """Quantize `model` keeping in float the blocks that reach `target_sqnr_db`, the ones that remove the
    most noise per microsecond of float cost first (see `SensitivityReport.recommend`).

    The recovery passes fit the calibration data (weight refit, bias correction), so a model measured on
    its own calibration batches looks better than it is: on ImageNet MobileNetV2 the all-int8 simulation
    measured 20.2 dB on its 64 calibration crops and 18.9 dB on held-out crops, and a choice verified on
    the calibration crops for 30 dB landed at 28.9 dB. The choice is therefore made and verified on
    models calibrated without the last quarter of the batches, measured on that quarter; the returned
    model keeps the chosen blocks float and is calibrated on all batches.
    """
    from fxq.analysis.sensitivity import sensitivity
    from fxq.api import quantize

    fit, held_out = held_out_split(batches)
    report = sensitivity(model, example_inputs, calibration_data=fit, eval_data=held_out, **quantize_options)
    kept = report.recommend(target_sqnr_db)
    recommendation = report.recommendation
    if held_out is fit:
        quantized, where = recommendation.model, "on its only calibration batch (nothing to hold out)"
    else:
        quantized = quantize(model, example_inputs, calibration_data=batches,
                             **with_float(quantize_options, kept))
        where = (f"on {len(held_out)} held-out calibration batch(es), calibrated on the other {len(fit)}; "
                 f"this model is then calibrated on all {len(batches)}")
    summary = summary_of(quantized)
    solo = {layer.name: layer.solo_sqnr_db for layer in report.layers}
    _label_kept_layers(summary, kept, lambda name, unit: (
        f"mixed precision: solo SQNR {solo[name]:.1f} dB" + (f" (block {unit})" if unit != name else "")
        if solo.get(name) is not None else f"mixed precision: block {unit}"))
    summary.options["target_sqnr_db"] = target_sqnr_db
    summary.notes.append(
        f"target_sqnr_db={target_sqnr_db:g}: all-int8 model measured {report.end_to_end_sqnr_db:.1f} dB; "
        f"{len(kept)} block(s) or layer(s) kept in float reach {recommendation.verified_sqnr_db:.1f} dB, "
        f"measured {where}; estimated +{recommendation.float_cost_us:.0f} us over all int8 (attempts: "
        f"{recommendation.attempts})")
    return quantized


def quantize_to_metric(model: nn.Module, example_inputs: Batch, batches: Sequence[Batch],
                       eval_fn: Callable[[nn.Module], float], max_drop: float,
                       quantize_options: dict[str, Any], max_verifications: int = 8) -> nn.Module:
    """Quantize `model` keeping in float the fewest blocks for which eval_fn(int8) >= eval_fn(float) - max_drop.

    `eval_fn` scores a model (higher is better, e.g. top-1 accuracy on the user's validation data). The
    blocks ranked by the sensitivity analyzer (`SensitivityReport.float_units`: solo noise per estimated
    microsecond of float cost) are kept in float in that order: the count doubles until the drop is
    within `max_drop`, then bisection finds the smallest count that still is.
    """
    from fxq.analysis.sensitivity import sensitivity
    from fxq.api import quantize
    from fxq.errors import ConfigError

    float_score = float(eval_fn(copy.deepcopy(model).eval()))
    report = sensitivity(model, example_inputs, calibration_data=batches, **quantize_options)
    units = report.float_units()
    scores: dict[int, float] = {0: float(eval_fn(report.quantized))}
    models: dict[int, nn.Module] = {0: report.quantized}

    def score_with(count: int) -> bool:
        if count not in scores:
            models[count] = quantize(model, example_inputs, calibration_data=batches,
                                     **with_float(quantize_options, [unit.name for unit in units[:count]]))
            scores[count] = float(eval_fn(models[count]))
        return float_score - scores[count] <= max_drop

    low, high = 0, None  # low fails, high (when known) passes
    if not score_with(0):
        count = 1
        while high is None:
            count = min(count, len(units))
            if score_with(count):
                high = count
            elif count == len(units):
                raise ConfigError(
                    f"max_drop={max_drop:g} is out of reach: float scores {float_score:.4g}, and with all "
                    f"{count} measured blocks in float the model scores {scores[count]:.4g}; raise max_drop")
            else:
                low, count = count, count * 2
        while high - low > 1 and len(scores) < max_verifications:
            middle = (low + high) // 2
            low, high = (low, middle) if score_with(middle) else (middle, high)
    else:
        high = 0
    quantized = models[high]
    summary = summary_of(quantized)
    kept = [unit.name for unit in units[:high]]
    _label_kept_layers(summary, kept, lambda name, unit: f"mixed precision (eval_fn): block {unit}")
    summary.options.update(max_drop=max_drop, eval_fn=getattr(eval_fn, "__name__", repr(eval_fn)))
    summary.notes.append(
        f"eval_fn: float {float_score:.4g}, all-int8 {scores[0]:.4g}; {high} block(s) or layer(s) kept in float "
        f"score {scores[high]:.4g} (max_drop {max_drop:g}; attempts: {sorted(scores.items())})")
    return quantized


def _label_kept_layers(summary: Any, kept: Sequence[str], label: Callable[[str, str], str]) -> None:
    """Say in the summary why each layer inside a kept block or layer is float: label(layer, block)."""
    def unit_of(name: str) -> str | None:
        return next((unit for unit in kept if name == unit or name.startswith(unit + ".")), None)

    summary.float_layers = [(name, label(name, unit_of(name)) if unit_of(name) else why)
                            for name, why in summary.float_layers]
