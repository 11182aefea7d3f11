"""Sensitivity by module swaps, for int8 models that are not one traced graph.

A model whose forward does not trace is quantized as regions (static) or by swapping its Linear and
recurrent layers for dynamic int8 modules (dynamic mode); Hugging Face transformers are the common case.
There is no graph to run beside the float one, but every int8 unit replaces a float submodule of the same
name, so each can be measured by swapping: the model's output with only that unit in int8 (solo SQNR,
the ranking the graph analyzer uses too), and the unit's own output inside the all-int8 model against
the float model's (accumulated SQNR). `recommend` keeps the lowest-solo units float until the verified
end-to-end SQNR reaches a target.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from fxq.analysis.metrics import sqnr_db
from fxq.analysis.search import fewest_passing
from fxq.backend.engine import using_engine
from fxq.backend.op_kinds import is_quantized_module
from fxq.calibration import Batch, output_tensors
from fxq.config import key_covers
from fxq.errors import ConfigError
from fxq.frontend.graph import replace_module
from fxq.summary import attach, summary_of


@dataclass
class UnitSensitivity:
    """One int8 unit (a region or a swapped layer) of the model, by module path."""

    name: str
    op: str  # int8 module type, or "region" for a quantized submodule graph
    solo_sqnr_db: float  # end-to-end output SQNR with only this unit in int8
    sqnr_db: float  # accumulated: this unit's output in the all-int8 model vs in the float model
    impact_rank: int = 0  # 1 = lowest solo SQNR


@dataclass
class SwapRecommendation:
    target_sqnr_db: float
    kept_float: list[str]
    verified_sqnr_db: float
    attempts: dict[int, float] = field(default_factory=dict)  # units kept float -> measured SQNR


def _contains_int8(module: nn.Module) -> bool:
    return any(is_quantized_module(m) for m in module.modules())


def replaced_units(float_model: nn.Module, quantized: nn.Module) -> list[str]:
    """The outermost submodules of `quantized` that hold int8 kernels and replace a float submodule of the
    same name and another type (a region's graph, a dynamic int8 layer)."""
    float_modules = dict(float_model.named_modules())
    units: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            original = float_modules.get(name)
            if original is not None and type(original) is not type(child) and _contains_int8(child):
                units.append(name)
            else:
                visit(name, child)

    visit("", quantized)
    return units


class _Outputs:
    """The float model's outputs on the eval batches, and SQNR of any model's outputs against them."""

    def __init__(self, float_model: nn.Module, batches: Sequence[Batch]) -> None:
        self.batches = list(batches)
        self.reference = self.run(float_model)

    def run(self, model: nn.Module) -> list[torch.Tensor]:
        with torch.no_grad():
            return [t.detach().float().flatten() for b in self.batches for t in output_tensors(model(*b))]

    def sqnr(self, model: nn.Module) -> float:
        return float(sqnr_db(torch.cat(self.reference), torch.cat(self.run(model))))


class ModuleSensitivityReport:
    """Per-unit rows of a model quantized without one graph. str() ranks them by solo SQNR (lowest
    first); `recommend(target)` keeps units float until the end-to-end SQNR is verified to reach it."""

    def __init__(self, units: list[UnitSensitivity], end_to_end_sqnr_db: float, engine: str, quantized: nn.Module,
                 float_model: nn.Module, outputs: _Outputs) -> None:
        self.units = units
        self.end_to_end_sqnr_db = end_to_end_sqnr_db
        self.engine = engine
        self.quantized = quantized
        self.recommendation: SwapRecommendation | None = None
        self._float_model = float_model
        self._outputs = outputs

    @property
    def layers(self) -> list[UnitSensitivity]:
        return self.units

    def __repr__(self) -> str:
        return (f"ModuleSensitivityReport({len(self.units)} units, end-to-end {self.end_to_end_sqnr_db:.1f} dB, "
                f"engine {self.engine})")

    def __str__(self) -> str:
        from tabulate import tabulate

        rows = [[u.impact_rank, u.name, u.op, f"{u.solo_sqnr_db:.1f}", f"{u.sqnr_db:.1f}"]
                for u in sorted(self.units, key=lambda u: u.impact_rank)]
        text = (f"end-to-end SQNR {self.end_to_end_sqnr_db:.1f} dB ({len(self.units)} int8 units measured by "
                f"module swaps; engine {self.engine})\n")
        text += tabulate(rows, headers=["rank", "unit", "int8 op", "solo SQNR dB", "accumulated SQNR dB"])
        if self.recommendation is not None:
            r = self.recommendation
            text += (f"\n\ntarget {r.target_sqnr_db:g} dB: keep float {', '.join(r.kept_float) or 'nothing'} "
                     f"-> {r.verified_sqnr_db:.1f} dB verified")
        return text

    def to_json(self) -> str:
        return json.dumps({"end_to_end_sqnr_db": self.end_to_end_sqnr_db, "engine": self.engine,
                           "units": [asdict(u) for u in self.units],
                           "recommendation": asdict(self.recommendation) if self.recommendation else None})

    def with_float(self, names: Sequence[str]) -> nn.Module:
        """A copy of the int8 model with the named units swapped back to their float modules."""
        return self.swapped_back(self.quantized, self._float_model, names, self.units)

    @staticmethod
    def swapped_back(quantized: nn.Module, float_model: nn.Module, names: Sequence[str],
                     units: Sequence[UnitSensitivity]) -> nn.Module:
        """A copy of `quantized` with the named units replaced by eval-mode copies of `float_model`'s, and a
        copy of its summary that lists them float (with their solo SQNR from `units`). The copy's int8
        weights are packed for the model's engine (copying packs them for the current one)."""
        summary = summary_of(quantized)
        with using_engine(summary.engine if summary is not None else torch.backends.quantized.engine):
            model = copy.deepcopy(quantized)
        for name in names:
            replace_module(model, name, copy.deepcopy(float_model.get_submodule(name)).eval())
        if summary is not None:
            summary = copy.deepcopy(summary)
            solo = {unit.name: unit.solo_sqnr_db for unit in units}
            summary.float_layers = [(name, why) for name, why in summary.float_layers if not key_covers(names, name)] \
                + [(name, f"mixed precision: solo SQNR {solo[name]:.1f} dB") for name in names]
            attach(model, summary)
        return model

    def recommend(self, target_sqnr_db: float) -> SwapRecommendation:
        """Keep the lowest-solo units float, doubling their count until the target is verified on the eval
        batches, then bisecting for the fewest."""
        order = [u.name for u in sorted(self.units, key=lambda u: u.impact_rank)]
        attempts: dict[int, float] = {0: self.end_to_end_sqnr_db}

        def reaches(count: int) -> bool:
            if count not in attempts:
                attempts[count] = self._outputs.sqnr(self.with_float(order[:count]))
            return attempts[count] >= target_sqnr_db

        high = fewest_passing(len(order), reaches)
        if high is None:
            raise ConfigError(f"target_sqnr_db={target_sqnr_db:g} is out of reach: with all {len(order)} int8 units "
                              f"float again the model measures {attempts[len(order)]:.1f} dB; lower the target")
        self.recommendation = SwapRecommendation(target_sqnr_db, order[:high], attempts[high], dict(sorted(attempts.items())))
        return self.recommendation


def analyze_by_swaps(float_model: nn.Module, quantized: nn.Module, eval_batches: Sequence[Batch],
                     engine: str) -> ModuleSensitivityReport:
    """Measure each int8 unit of `quantized` (see `replaced_units`) against `float_model` on `eval_batches`."""
    names = replaced_units(float_model, quantized)
    if not names:
        raise ConfigError(f"{type(quantized).__name__}: no int8 submodule replaces a float one, nothing to measure")
    outputs = _Outputs(float_model, eval_batches)
    accumulated = _accumulated_sqnr(float_model, quantized, names, outputs.batches)
    units = []
    solo = copy.deepcopy(float_model)  # one unit in int8 at a time, put back after its measurement
    for name in names:
        module, original = quantized.get_submodule(name), solo.get_submodule(name)
        replace_module(solo, name, module)
        op = "region" if isinstance(module, torch.fx.GraphModule) else type(module).__name__
        units.append(UnitSensitivity(name, op, outputs.sqnr(solo), accumulated[name]))
        replace_module(solo, name, original)
    for rank, unit in enumerate(sorted(units, key=lambda u: u.solo_sqnr_db), start=1):
        unit.impact_rank = rank
    return ModuleSensitivityReport(units, outputs.sqnr(quantized), engine, quantized, float_model, outputs)


def _accumulated_sqnr(float_model: nn.Module, quantized: nn.Module, names: list[str],
                      batches: Sequence[Batch]) -> dict[str, float]:
    """Each unit's output in the int8 model against the same unit's output in the float model."""
    recorded: dict[str, dict[str, list[torch.Tensor]]] = {"float": {}, "int8": {}}

    def recorder(side: str, name: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            recorded[side].setdefault(name, []).extend(t.detach().float().flatten() for t in output_tensors(output))
        return hook

    handles = [model.get_submodule(name).register_forward_hook(recorder(side, name))
               for side, model in (("float", float_model), ("int8", quantized)) for name in names]
    try:
        with torch.no_grad():
            for batch in batches:
                float_model(*batch)
                quantized(*batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: float(sqnr_db(torch.cat(recorded["float"][name]), torch.cat(recorded["int8"][name])))
            if recorded["float"].get(name) and len(recorded["float"][name]) == len(recorded["int8"].get(name, []))
            else float("nan") for name in names}
