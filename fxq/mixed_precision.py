"""Accuracy-targeted mixed precision: the fewest layers in float that reach a target.

The target is an output SQNR (`target_sqnr_db`) or the user's own metric (`eval_fn` + `max_drop`: the
int8 model may score at most `max_drop` below the float model). Both are guided by the sensitivity
analyzer: blocks ranked by solo noise per microsecond that keeping them float costs, their layers timed
on this machine (see `float_units` and `float_unit_costs`), then verified end to end; the layers kept in
float, what was reached and the attempts go into the quantized model's summary and report.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

from torch import nn

from fxq.analysis.module_sensitivity import ModuleSensitivityReport
from fxq.analysis.search import fewest_passing
from fxq.analysis.sensitivity import analyze
from fxq.calibration import Batch
from fxq.config import QuantOptions, key_covers
from fxq.errors import ConfigError
from fxq.pipeline import quantize_model
from fxq.summary import summary_of


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
                       target_sqnr_db: float, options: QuantOptions) -> nn.Module:
    """Quantize `model` keeping in float the blocks that reach `target_sqnr_db`, the ones that remove the
    most noise per microsecond of float cost first (see `SensitivityReport.recommend`).

    The recovery passes fit the calibration data (weight refit, bias correction), so a model measured on
    its own calibration batches looks better than it is (by 1.3 dB on ImageNet MobileNetV2, see
    docs/design/mixed-precision.md). The choice is therefore made and verified on
    models calibrated without the last quarter of the batches, measured on that quarter; the returned
    model keeps the chosen blocks float and is calibrated on all batches.
    """
    fit, held_out = held_out_split(batches)
    report = analyze(model, example_inputs, fit, held_out, options)
    if isinstance(report, ModuleSensitivityReport):
        return _quantize_to_target_by_swaps(model, example_inputs, batches, report, target_sqnr_db, options,
                                            len(fit), len(held_out), held_out is fit)
    kept = report.recommend(target_sqnr_db)
    recommendation = report.recommendation
    if held_out is fit:
        quantized, where = recommendation.model, "on its only calibration batch (nothing to hold out)"
    else:
        quantized = quantize_model(model, example_inputs, batches, options.with_float(kept)).model
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


def _quantize_to_target_by_swaps(model: nn.Module, example_inputs: Batch, batches: Sequence[Batch],
                                 report: ModuleSensitivityReport, target_sqnr_db: float, options: QuantOptions,
                                 fit: int, held_out: int, same: bool) -> nn.Module:
    """`quantize_to_target` for a model quantized without one graph: units (regions, swapped layers) are
    kept float by swapping their float modules back (analysis.module_sensitivity), chosen and verified on
    the held-out batches; the returned model is quantized on all batches with the same units float."""
    recommendation = report.recommend(target_sqnr_db)
    kept = recommendation.kept_float
    if same:
        quantized, where = report.with_float(kept), "on its only calibration batch (nothing to hold out)"
    else:
        full = quantize_model(model, example_inputs, batches, options).model
        quantized = ModuleSensitivityReport.swapped_back(full, model, kept, report.units)
        where = (f"on {held_out} held-out calibration batch(es), calibrated on the other {fit}; this model is then "
                 f"calibrated on all {len(batches)}")
    summary = summary_of(quantized)
    summary.options["target_sqnr_db"] = target_sqnr_db
    summary.notes.append(
        f"target_sqnr_db={target_sqnr_db:g}: all-int8 model measured {report.end_to_end_sqnr_db:.1f} dB; "
        f"{len(kept)} unit(s) swapped back to float reach {recommendation.verified_sqnr_db:.1f} dB, measured {where} "
        f"(module swaps: the model is not one traced graph; attempts: {recommendation.attempts})")
    return quantized


def quantize_to_metric(model: nn.Module, example_inputs: Batch, batches: Sequence[Batch],
                       eval_fn: Callable[[nn.Module], float], max_drop: float,
                       options: QuantOptions, max_verifications: int = 8) -> nn.Module:
    """Quantize `model` keeping in float the fewest blocks for which eval_fn(int8) >= eval_fn(float) - max_drop.

    `eval_fn` scores a model (higher is better, e.g. top-1 accuracy on the user's validation data). The
    blocks ranked by the sensitivity analyzer (`SensitivityReport.float_units`: solo noise per estimated
    microsecond of float cost) are kept in float in that order: the count doubles until the drop is
    within `max_drop`, then bisection finds the smallest count that still is.
    """
    float_score = float(eval_fn(copy.deepcopy(model).eval()))
    report = analyze(model, example_inputs, list(batches), list(batches), options)
    swaps = isinstance(report, ModuleSensitivityReport)  # not one graph: units are swapped back to float
    units = sorted(report.units, key=lambda unit: unit.impact_rank) if swaps else report.float_units()
    scores: dict[int, float] = {0: float(eval_fn(report.quantized))}
    models: dict[int, nn.Module] = {0: report.quantized}

    def score_with(count: int) -> bool:
        if count not in scores:
            names = [unit.name for unit in units[:count]]
            models[count] = report.with_float(names) if swaps else \
                quantize_model(model, example_inputs, batches, options.with_float(names)).model
            scores[count] = float(eval_fn(models[count]))
        return float_score - scores[count] <= max_drop

    high = fewest_passing(len(units), score_with, lambda: len(scores) < max_verifications)
    if high is None:
        raise ConfigError(
            f"max_drop={max_drop:g} is out of reach: float scores {float_score:.4g}, and with all "
            f"{len(units)} measured blocks in float the model scores {scores[len(units)]:.4g}; raise max_drop")
    quantized = models[high]
    summary = summary_of(quantized)
    kept = [unit.name for unit in units[:high]]
    if not swaps:  # with_float listed the swapped units already
        _label_kept_layers(summary, kept, lambda name, unit: f"mixed precision (eval_fn): block {unit}")
    summary.options.update(max_drop=max_drop, eval_fn=getattr(eval_fn, "__name__", repr(eval_fn)))
    summary.notes.append(
        f"eval_fn: float {float_score:.4g}, all-int8 {scores[0]:.4g}; {high} block(s) or layer(s) kept in float "
        f"score {scores[high]:.4g} (max_drop {max_drop:g}; attempts: {sorted(scores.items())})")
    return quantized


def _label_kept_layers(summary: Any, kept: Sequence[str], label: Callable[[str, str], str]) -> None:
    """Say in the summary why each layer inside a kept block or layer is float: label(layer, block)."""
    def unit_of(name: str) -> str | None:
        return next((unit for unit in kept if key_covers([unit], name)), None)

    summary.float_layers = [(name, label(name, unit_of(name)) if unit_of(name) else why)
                            for name, why in summary.float_layers]
