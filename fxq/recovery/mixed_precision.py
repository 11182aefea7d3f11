"""Accuracy-targeted mixed precision: the fewest layers in float that reach a target.

The target is an output SQNR (`target_sqnr_db`) or the user's own metric (`eval_fn` + `max_drop`: the
int8 model may score at most `max_drop` below the float model). Both are guided by the sensitivity
analyzer: blocks ranked by solo impact (see `float_units`), then verified end to end; the layers kept in
float, what was reached and the attempts go into the quantized model's summary and report.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

from torch import nn

from fxq.calibration import Batch
from fxq.summary import summary_of


def quantize_to_target(model: nn.Module, example_inputs: Batch, batches: Sequence[Batch],
                       target_sqnr_db: float, quantize_options: dict[str, Any]) -> nn.Module:
    """Quantize `model` keeping in float the fewest layers that reach `target_sqnr_db` on `batches`."""
    from fxq.analysis.sensitivity import sensitivity

    report = sensitivity(model, example_inputs, calibration_data=batches, **quantize_options)
    kept = report.recommend(target_sqnr_db)
    recommendation = report.recommendation
    quantized = recommendation.model
    summary = summary_of(quantized)
    solo = {layer.name: layer.solo_sqnr_db for layer in report.layers}
    _label_kept_layers(summary, kept, lambda name, unit: (
        f"mixed precision: solo SQNR {solo[name]:.1f} dB" + (f" (block {unit})" if unit != name else "")
        if solo.get(name) is not None else f"mixed precision: block {unit}"))
    summary.options["target_sqnr_db"] = target_sqnr_db
    summary.notes.append(
        f"target_sqnr_db={target_sqnr_db:g}: all-int8 model measured {report.end_to_end_sqnr_db:.1f} dB; "
        f"{len(kept)} block(s) or layer(s) kept in float reach {recommendation.verified_sqnr_db:.1f} dB "
        f"(attempts: {recommendation.attempts})")
    return quantized


def quantize_to_metric(model: nn.Module, example_inputs: Batch, batches: Sequence[Batch],
                       eval_fn: Callable[[nn.Module], float], max_drop: float,
                       quantize_options: dict[str, Any], max_verifications: int = 8) -> nn.Module:
    """Quantize `model` keeping in float the fewest blocks for which eval_fn(int8) >= eval_fn(float) - max_drop.

    `eval_fn` scores a model (higher is better, e.g. top-1 accuracy on the user's validation data). The
    blocks ranked by the sensitivity analyzer are kept in float in that order: the count doubles until
    the drop is within `max_drop`, then bisection finds the smallest count that still is.
    """
    from fxq.analysis.sensitivity import float_units, sensitivity
    from fxq.api import quantize
    from fxq.errors import ConfigError

    float_score = float(eval_fn(copy.deepcopy(model).eval()))
    report = sensitivity(model, example_inputs, calibration_data=batches, **quantize_options)
    units = float_units([layer for layer in report.layers if layer.solo_sqnr_db is not None])
    scores: dict[int, float] = {0: float(eval_fn(report.quantized))}
    models: dict[int, nn.Module] = {0: report.quantized}

    def score_with(count: int) -> bool:
        if count not in scores:
            options = dict(quantize_options, keep_float=tuple(quantize_options.get("keep_float", ()))
                           + tuple(unit.name for unit in units[:count]))
            models[count] = quantize(model, example_inputs, calibration_data=batches, **options)
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
