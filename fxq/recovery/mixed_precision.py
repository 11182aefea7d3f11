"""Accuracy-targeted mixed precision: the fewest layers in float that reach a target output SQNR.

Guided by the sensitivity analyzer (layers ranked by solo impact, then verified end to end); the layers
kept in float, the SQNR reached and the attempts go into the quantized model's summary and report.
"""

from __future__ import annotations

from typing import Any, Sequence

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

    def reason(name: str, why: str) -> str:
        unit = next((k for k in kept if name == k or name.startswith(k + ".")), None)
        if unit is None or solo.get(name) is None:
            return why
        return f"mixed precision: solo SQNR {solo[name]:.1f} dB" + (f" (block {unit})" if unit != name else "")

    summary.float_layers = [(name, reason(name, why)) for name, why in summary.float_layers]
    summary.options["target_sqnr_db"] = target_sqnr_db
    summary.notes.append(
        f"target_sqnr_db={target_sqnr_db:g}: all-int8 model measured {report.end_to_end_sqnr_db:.1f} dB; "
        f"{len(kept)} layer(s) kept in float reach {recommendation.verified_sqnr_db:.1f} dB "
        f"(attempts: {recommendation.attempts})")
    return quantized
