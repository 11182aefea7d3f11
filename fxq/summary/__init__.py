"""What fxq did to a model: the record the reporter prints and `fxq.summary_of` returns.

Kept in a weak registry keyed by the quantized module rather than as an attribute, so the int8 model
stays a plain module that scripts and saves cleanly.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn


@dataclass
class QuantizationSummary:
    options: dict[str, Any]
    engine: str
    engine_reason: str
    reduce_range: bool
    kernel_saturates: bool
    seven_bit_weights: bool = False
    # on a saturating kernel, by layer: the output channels measured to keep 8-bit weights (backend.weight_bits)
    eight_bit_weight_channels: dict[str, list[int]] = field(default_factory=dict)
    patterns: list[str] = field(default_factory=list)
    rewrites: list[str] = field(default_factory=list)
    # (module or node, why): layers or ops that run in float in the returned model
    float_layers: list[tuple[str, str]] = field(default_factory=list)
    # (ops, why): ops without int8 kernels and float islands, which run between dequantize and quantize
    float_ops: list[tuple[str, str]] = field(default_factory=list)
    # quantize / dequantize calls per forward of the int8 model
    conversions: dict[str, int] = field(default_factory=dict)
    # the float-island cost model's estimates (us): whole model float, every op int8, fxq's plan
    estimated_latency_us: dict[str, float] = field(default_factory=dict)
    equalized_pairs: int = 0
    bias_corrected_layers: int = 0
    rounded_layers: int = 0
    observer_choices: dict[str, str] = field(default_factory=dict)
    # SQNR (dB) of each candidate engine's int8 output against the float simulation, when measured
    engine_fidelity_db: dict[str, float] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        """What was done, in a few lines: engine, counts, what stays float and why, step timings."""
        lines = [f"engine {self.engine}: {self.engine_reason}",
                 f"{len(self.patterns)} patterns, {len(self.rewrites)} rewrites, {self.equalized_pairs} layer pairs "
                 f"equalized, {self.bias_corrected_layers} biases corrected, {self.rounded_layers} layers with "
                 "optimized rounding"]
        if self.conversions:
            lines.append(f"quantize / dequantize per call: {self.conversions.get('quantize', 0)} / "
                         f"{self.conversions.get('dequantize', 0)}")
        lines += [f"float layer {name}: {why}" for name, why in self.float_layers]
        lines += [f"float ops {what}: {why}" for what, why in self.float_ops]
        lines += [f"note: {note}" for note in self.notes]
        if self.timings_s:
            lines.append("steps (s): " + ", ".join(f"{step} {seconds:.1f}" for step, seconds in self.timings_s.items()))
        return "\n".join(lines)


_SUMMARIES: "weakref.WeakKeyDictionary[nn.Module, QuantizationSummary]" = weakref.WeakKeyDictionary()


def attach(model: nn.Module, summary: QuantizationSummary) -> None:
    _SUMMARIES[model] = summary


def summary_of(model: nn.Module) -> QuantizationSummary | None:
    """The summary of a model returned by fxq.quantize / fxq.convert, or None for other models."""
    return _SUMMARIES.get(model)
