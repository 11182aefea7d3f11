"""Per-layer sensitivity of a model to int8 quantization: which layers lose accuracy, and why.

    report = fxq.sensitivity(model, example_inputs, calibration_data=batches)
    print(report)                       # ranked by impact on the output
    report.recommend(target_sqnr_db=30) # blocks to keep in float, cheapest noise first, verified end to end

The int8 model is `fxq.quantize`'s own. The float reference is the graph `fxq.quantize` quantized:
traced, BatchNorm folded, clamps fused and channels equalized, which computes the model's function with
the int8 model's module names and activation scales (equalization rescales channels, so the original
model's intermediate activations would not line up). Weight rounding and bias correction are left out
of the reference: they change the float function on purpose, and their effect is part of what is measured.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import fx, nn

from fxq.analysis.metrics import ErrorStats, channel_range_ratio, sqnr_db
from fxq.analysis.float_costs import float_unit_costs
from fxq.analysis.shadow import LayerErrors, LayerPair, is_float_input, pair_layers, run_side_by_side
from fxq.backend.engine import using_engine
from fxq.backend.op_kinds import is_weighted_quantized_module
from fxq.calibration import Batch, materialize, output_tensors
from fxq.config import Mode, QuantOptions
from fxq.errors import ConfigError, FxqError, InputError
from fxq.frontend.rewrite import unwrap
from fxq.analysis.module_sensitivity import ModuleSensitivityReport, analyze_by_swaps
from fxq.pipeline import FloatGraph, eval_copy, quantize_model
from fxq.summary import summary_of
from fxq.validate import as_example_inputs, check_model, positional_batches


@dataclass(frozen=True)
class LayerSensitivity:
    """One quantized layer's errors over the eval data (dB: higher is better; None: not measurable)."""

    name: str  # module path, e.g. "features.1.conv.0.0"
    op: str  # int8 module type, e.g. "ConvReLU2d"
    pattern: str | None  # fused float pattern, e.g. "conv-bn-clamp"
    index: int  # position among the quantized layers in graph order
    impact_rank: int  # 1 = lowest solo SQNR (largest impact on the output)
    sqnr_db: float  # accumulated: int8 model's activation here vs the float model's
    own_sqnr_db: float | None  # isolated: int8 layer on the float input vs the float layer
    solo_sqnr_db: float | None  # end-to-end output SQNR with only this layer in int8
    mse: float  # accumulated error, like sqnr_db
    cosine: float
    max_abs_error: float
    weight_sqnr_db: float | None  # int8 weight (as the kernel uses it) vs float weight
    weight_range_ratio: float | None  # max/min per-output-channel weight range
    activation_min: float  # float activation at the layer's output
    activation_max: float
    outlier_ratio: float  # peak |activation| / RMS
    input_scale: float | None
    input_zero_point: int | None
    output_scale: float  # nan for a dynamic layer (backend.float_outputs): it returns float
    output_zero_point: int


@dataclass
class Recommendation:
    """The result of `SensitivityReport.recommend`: layers kept in float and the SQNR fxq measured."""

    target_sqnr_db: float
    keep_float: list[str]
    verified_sqnr_db: float
    attempts: list[tuple[int, float]] = field(default_factory=list)  # (units in float, measured SQNR)
    model: nn.Module | None = field(default=None, repr=False)  # the verified mixed-precision model
    float_cost_us: float = 0.0  # estimated batch-1 latency the kept units add over all int8 (cost model)

    def to_dict(self) -> dict[str, Any]:
        return {"target_sqnr_db": self.target_sqnr_db, "keep_float": list(self.keep_float),
                "verified_sqnr_db": _finite(self.verified_sqnr_db),
                "attempts": [[count, _finite(value)] for count, value in self.attempts],
                "float_cost_us": round(self.float_cost_us, 1)}


@dataclass
class _Inputs:
    """What `recommend` needs to quantize again and measure: the user's model and data, not copies."""

    model: nn.Module
    example_inputs: Batch
    calibration_batches: list[Batch]
    eval_batches: list[Batch]
    options: QuantOptions
    reference_outputs: list[list[torch.Tensor]]
    float_graph: fx.GraphModule  # the float reference, for the latency cost model of float units
    engine: str
    built: FloatGraph | None = None  # the pipeline's float graph that was quantized, for quantizing again


class SensitivityReport:
    """Per-layer sensitivity rows (`layers`, in graph order) and the int8 model they describe.

    str() is a table ranked by impact (solo SQNR, lowest first); `to_json`, `to_csv` and `plot` export it;
    `recommend` picks layers to keep in float for a target end-to-end SQNR.
    """

    def __init__(self, layers: list[LayerSensitivity], end_to_end_sqnr_db: float, engine: str,
                 options: dict[str, Any], eval_batches: int, timings_s: dict[str, float],
                 quantized: nn.Module, inputs: _Inputs | None = None) -> None:
        self.layers = layers
        self.end_to_end_sqnr_db = end_to_end_sqnr_db
        self.engine = engine
        self.options = options
        self.eval_batches = eval_batches
        self.timings_s = timings_s
        self.quantized = quantized
        self.recommendation: Recommendation | None = None
        self._inputs = inputs
        self._units: list[FloatUnit] | None = None

    def __repr__(self) -> str:
        return (f"SensitivityReport({len(self.layers)} layers, end-to-end {self.end_to_end_sqnr_db:.1f} dB, "
                f"engine {self.engine})")

    def __getitem__(self, name: str) -> LayerSensitivity:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no quantized layer named '{name}'; layers: {', '.join(l.name for l in self.layers[:8])}"
                       + (", ..." if len(self.layers) > 8 else ""))

    def ranked(self) -> list[LayerSensitivity]:
        """Layers by impact on the output, largest first (lowest solo SQNR)."""
        return sorted(self.layers, key=lambda layer: layer.impact_rank)

    def float_units(self) -> list[FloatUnit]:
        """The blocks `recommend` may keep float, by solo noise per estimated microsecond of float cost.

        Costs come from the float-island cost model with each conv and linear layer's float and int8
        times measured on this machine (`float_unit_costs`) when the report carries its model and data;
        otherwise the units are ranked by solo noise alone.
        """
        if self._units is None:
            measured = [layer for layer in self.layers if layer.solo_sqnr_db is not None]
            cost_us = None
            if self._inputs is not None:
                inputs = self._inputs
                names = [unit.name for unit in float_units(measured)]
                start = time.perf_counter()
                cost_us = float_unit_costs(inputs.float_graph, inputs.example_inputs, names, inputs.engine,
                                           inputs.options.keep_float, int8_model=self.quantized)
                self.timings_s["unit_costs"] = round(time.perf_counter() - start, 3)
            self._units = float_units(measured, cost_us)
        return self._units

    def _table(self, tablefmt: str) -> str:
        from tabulate import tabulate

        rows = [[layer.impact_rank, layer.name, layer.op, layer.pattern or "-", _db(layer.solo_sqnr_db),
                 _db(layer.own_sqnr_db), _db(layer.sqnr_db), _db(layer.weight_sqnr_db),
                 _number(layer.weight_range_ratio, ".1f"),
                 f"[{layer.activation_min:.3g}, {layer.activation_max:.3g}]", f"{layer.outlier_ratio:.1f}",
                 f"{layer.cosine:.5f}", f"{layer.mse:.3g}", f"{layer.max_abs_error:.3g}"]
                for layer in self.ranked()]
        headers = ["rank", "layer", "op", "pattern", "solo dB", "own dB", "accum dB", "weight dB",
                   "w range ratio", "activation range", "outlier", "cosine", "mse", "max abs err"]
        return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)

    def _title(self) -> str:
        return (f"int8 sensitivity: end-to-end SQNR {_db(self.end_to_end_sqnr_db)} dB over {self.eval_batches} "
                f"eval batch(es), engine {self.engine}; ranked by solo SQNR (output SQNR with only that layer "
                "in int8), lowest first")

    def _recommendation_line(self) -> str:
        rec = self.recommendation
        return "" if rec is None else (f"\n\nrecommended keep_float for {rec.target_sqnr_db:g} dB: {rec.keep_float} "
                                       f"(verified {_db(rec.verified_sqnr_db)} dB)")

    def __str__(self) -> str:
        return self._title() + "\n" + self._table("simple") + self._recommendation_line()

    def to_markdown(self) -> str:
        return self._title() + "\n\n" + self._table("github") + self._recommendation_line() + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "end_to_end_sqnr_db": _finite(self.end_to_end_sqnr_db), "engine": self.engine,
            "options": self.options, "eval_batches": self.eval_batches, "timings_s": self.timings_s,
            "layers": [{key: _finite(value) for key, value in dataclasses.asdict(layer).items()}
                       for layer in self.layers],
            "recommendation": self.recommendation.to_dict() if self.recommendation else None,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text (infinite SQNR, i.e. no error at all, is written as null); also written to `path`."""
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def to_csv(self, path: str | Path | None = None) -> str:
        """One row per layer in graph order, columns as `LayerSensitivity`; also written to `path`."""
        buffer = io.StringIO()
        names = [f.name for f in dataclasses.fields(LayerSensitivity)]
        writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for layer in self.layers:
            writer.writerow({key: "" if value is None else value for key, value in dataclasses.asdict(layer).items()})
        if path is not None:
            Path(path).write_text(buffer.getvalue())
        return buffer.getvalue()

    def plot(self, path: str | Path | None = None) -> Any:
        """Accumulated, own and solo SQNR per layer in graph order (needs matplotlib); returns the figure."""
        from fxq.analysis.plot import plot_sensitivity

        return plot_sensitivity(self, path)

    def recommend(self, target_sqnr_db: float, *, max_verifications: int = 7) -> list[str]:
        """Layers to keep in float so the int8 model reaches `target_sqnr_db` end to end (on the eval data).

        Layers are taken a block at a time (see `float_units`): a layer kept in float alone still reads a
        quantized input and writes a quantized output, so most of the activation error stays. Blocks
        come in the order of `self.float_units()`, most solo noise per microsecond of estimated float
        cost first, so that the target is met with a fast model (a float block at high resolution costs
        several times one at low resolution). How many is predicted from their solo noise powers, then
        checked by `fxq.quantize(..., keep_float=names)` and measured; while the measured SQNR falls short,
        more blocks are added from the ranking. Solo noises do not simply add up (errors interact, and a
        float layer still reads int8 inputs), so the first prediction is scaled by the share of all units'
        solo noise that the all-int8 model shows (`_solo_noise_share`) and each later one by the share of
        the chosen units' solo noise that keeping them in float actually removed. A first prediction that
        meets the target is checked one unit lower, then two, four, ...; an overshoot is narrowed by
        bisection. A cheap block ranked early may turn out unneeded once the costly ones are float (a
        layer refit to compensate an upstream layer's error shows that error as solo noise of its own),
        so the verifications left try leaving kept blocks out, least noise per microsecond first (those
        whose solo noise predicts a clear miss are not tried: PRUNE_TRIAL_FACTOR). The result and the
        attempts are kept in `self.recommendation` (with the verified model).
        """
        if not isinstance(target_sqnr_db, (int, float)) or not 0 < target_sqnr_db < 200:
            raise ConfigError(f"target_sqnr_db={target_sqnr_db!r} must be a positive number of dB")
        if self._inputs is None:
            raise InputError("this report carries no model and data to quantize again; recommendations need "
                             "a report returned by fxq.sensitivity")
        if self.end_to_end_sqnr_db >= target_sqnr_db:
            self.recommendation = Recommendation(target_sqnr_db, [], self.end_to_end_sqnr_db, [],
                                                 self.quantized)
            return []
        candidates = self.float_units()
        goal, all_int8 = _noise(target_sqnr_db), _noise(self.end_to_end_sqnr_db)
        noise, efficiency, count = all_int8, _solo_noise_share(candidates, all_int8), 0
        attempts: list[tuple[int, float]] = []
        while True:  # grow the set of float units until the target is met
            added = _units_to_cover(candidates[count:], (noise - goal) / efficiency)
            if len(attempts) == max_verifications - 1:
                added = len(candidates) - count
            names = [unit.name for unit in candidates[:count + added]]
            model, measured = self._measure_with_float(names)
            attempts.append((len(names), measured))
            if measured >= target_sqnr_db:
                break
            if len(names) >= len(candidates):
                raise ConfigError(
                    f"target_sqnr_db={target_sqnr_db:g} is out of reach: with all {len(names)} measured layers "
                    f"or blocks in float the model reaches {measured:.1f} dB (the remaining int8 ops and "
                    "untraceable parts limit it); lower the target")
            # over all units taken so far: one attempt's measurement is noisy (ranges are recalibrated)
            predicted = sum(unit.noise for unit in candidates[:len(names)])
            removed = (all_int8 - _noise(measured)) / predicted if predicted > 0 else 1.0
            efficiency = min(1.0, max(MIN_NOISE_SHARE, removed))
            noise, count = _noise(measured), len(names)
        low, high = count, len(names)
        if low == 0:  # the first prediction met the target: look just below it, then further down
            step = 1
            while high - step > low and len(attempts) < max_verifications:
                trial_model, trial = self._measure_with_float([unit.name for unit in candidates[:high - step]])
                attempts.append((high - step, trial))
                if trial < target_sqnr_db:
                    low = high - step
                    break
                high, model, measured, step = high - step, trial_model, trial, step * 2
        # the last step may have overshot: bisect between the last count that fell short and the one that met it
        while high - low > 1 and len(attempts) < max_verifications:
            middle = (low + high) // 2
            trial_model, trial = self._measure_with_float([unit.name for unit in candidates[:middle]])
            attempts.append((middle, trial))
            if trial >= target_sqnr_db:
                high, model, measured = middle, trial_model, trial
            else:
                low = middle
        kept = list(candidates[:high])
        if high - low == 1:  # the last kept unit is known to be needed; the others may not be
            margin = goal - _noise(measured)  # the noise the verified set may still take on
            for unit in reversed(kept[:-1]):
                if len(attempts) >= max_verifications:
                    break
                if unit.noise * efficiency > PRUNE_TRIAL_FACTOR * margin:
                    continue  # predicted to fall well short: not worth a verification
                trial_names = [other.name for other in kept if other is not unit]
                trial_model, trial = self._measure_with_float(trial_names)
                attempts.append((len(trial_names), trial))
                if trial >= target_sqnr_db:
                    kept.remove(unit)
                    model, measured = trial_model, trial
        names = [unit.name for unit in kept]
        self.recommendation = Recommendation(target_sqnr_db, names, measured, attempts, model,
                                             sum(unit.cost_us or 0.0 for unit in kept))
        return names

    def _measure_with_float(self, names: list[str]) -> tuple[nn.Module, float]:
        inputs = self._inputs
        model = quantize_model(inputs.model, inputs.example_inputs, inputs.calibration_batches,
                               inputs.options.with_float(names), float_graph=inputs.built).model
        stats = ErrorStats()
        with using_engine(summary_of(model).engine), torch.no_grad():
            for batch, references in zip(inputs.eval_batches, inputs.reference_outputs):
                for reference, test in zip(references, output_tensors(model(*batch)), strict=True):
                    stats.update(reference, test)
        return model, stats.sqnr_db


def _noise(db: float) -> float:
    """Noise power relative to the signal for an SQNR in dB."""
    return 10.0 ** (-db / 10.0)


# The share of summed solo noise that `recommend` assumes keeping units float removes is kept at least
# this: a share measured on one unit that removed almost nothing would otherwise ask for every unit.
MIN_NOISE_SHARE = 0.05

# `recommend` tries leaving a kept unit out only when its solo noise, scaled by the measured share, is at
# most this many times the noise the verified set may still take on. On ImageNet MobileNetV2 at
# target_sqnr_db=30 (8 units verified at 30.27 dB) the five units it skips predicted 7 to 15 times that
# margin, and leaving each out measured 24.1 to 28.6 dB: five quantize runs, 30 of 62 s, for nothing.
PRUNE_TRIAL_FACTOR = 4.0

# A block kept in float as one unit holds at most this many quantized layers (an inverted residual, a
# ResNet bottleneck with its downsample); larger modules are stages, too coarse to keep whole.
MAX_UNIT_LAYERS = 4


@dataclass(frozen=True)
class FloatUnit:
    """A module `recommend` keeps in float as a whole, with the solo noise of the layers inside it."""

    name: str
    layers: tuple[str, ...]
    noise: float  # sum of the layers' solo noise powers (relative to the output's power)
    cost_us: float | None = None  # estimated batch-1 latency keeping it float adds (None: not estimated)


# A unit estimated to cost less than this (us) counts as costing this much when ranked: the cost model is
# good to tens of microseconds, and a unit whose float version is estimated faster is not free of error.
MIN_UNIT_COST_US = 10.0


def float_units(layers: Sequence[LayerSensitivity], cost_us: Mapping[str, float] | None = None) -> list[FloatUnit]:
    """Group layers into the largest enclosing modules of 2..MAX_UNIT_LAYERS quantized layers, and rank them.

    Keeping a whole block float also keeps float the activations between its layers and its residual
    add; a layer without such a block is its own unit. Without `cost_us` (unit name -> estimated latency
    keeping it float adds), units are ranked by summed solo noise, largest first; with it, by noise per
    microsecond, so that cheap blocks come before expensive ones that remove little more noise.
    """
    names = [layer.name for layer in layers]

    def inside(prefix: str) -> int:
        return sum(1 for name in names if name.startswith(prefix + "."))

    members: dict[str, list[LayerSensitivity]] = {}
    for layer in layers:
        parts = layer.name.split(".")
        prefixes = (".".join(parts[:end]) for end in range(1, len(parts)))
        unit = next((prefix for prefix in prefixes if 2 <= inside(prefix) <= MAX_UNIT_LAYERS), layer.name)
        members.setdefault(unit, []).append(layer)
    units = [FloatUnit(name, tuple(layer.name for layer in group), sum(_noise(l.solo_sqnr_db) for l in group),
                       None if cost_us is None else cost_us[name])
             for name, group in members.items()]
    if cost_us is None:
        return sorted(units, key=lambda unit: -unit.noise)
    return sorted(units, key=lambda unit: -unit.noise / max(unit.cost_us, MIN_UNIT_COST_US))


def _solo_noise_share(units: Sequence[FloatUnit], all_int8_noise: float) -> float:
    """The all-int8 noise power over the units' summed solo noise: the share of solo noise that shows up.

    Solo noises overcount: with every layer in int8, errors partly cancel and the recovery passes refit
    downstream layers to their inputs' errors (on ImageNet MobileNetV2 the first conv alone in int8
    costs more noise than the whole int8 model). Without this prior the first prediction keeps the one
    unit with the most solo noise, which often removes little, and the next jumps to all of them.
    """
    total = sum(unit.noise for unit in units)
    return min(1.0, max(MIN_NOISE_SHARE, all_int8_noise / total)) if total > 0 else 1.0


def _units_to_cover(ranked: Sequence[FloatUnit], noise_to_remove: float) -> int:
    """How many of the ranked units' solo noise powers add up to `noise_to_remove` (at least one)."""
    removed = 0.0
    for count, unit in enumerate(ranked, start=1):
        removed += unit.noise
        if removed >= noise_to_remove:
            return count
    return max(1, len(ranked))


def _db(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) and value > 0 else f"{value:.1f}"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _finite(value: Any) -> Any:
    """JSON has no infinity: an SQNR of +inf (no error at all) is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _float_weight(pair: LayerPair) -> torch.Tensor | None:
    layer, _clamp = unwrap(pair.float_module)
    return layer.weight.detach() if layer is not None else None


def _int8_weight(pair: LayerPair) -> torch.Tensor | None:
    return pair.int8_module.weight() if is_weighted_quantized_module(pair.int8_module) else None


# --- the entry point -------------------------------------------------------------------------------

def _eval_batches(eval_data: Iterable[Any], example_inputs: Batch) -> list[Batch]:
    try:
        return materialize(eval_data, example_inputs)
    except FxqError as exc:
        raise type(exc)(f"eval_data: {exc}") from exc


def _row(pair: LayerPair, index: int, errors: LayerErrors, pattern: str | None) -> dict[str, Any]:
    float_weight, int8_weight = _float_weight(pair), _int8_weight(pair)
    has_weight = float_weight is not None and int8_weight is not None
    grid = None if is_float_input(errors.input_grid) else errors.input_grid  # a dynamic layer reads float
    accumulated = errors.accumulated
    return dict(
        name=pair.name, op=pair.op, pattern=pattern, index=index,
        sqnr_db=accumulated.sqnr_db,
        own_sqnr_db=errors.own.sqnr_db if errors.own.count else None,
        solo_sqnr_db=errors.solo.sqnr_db if errors.solo.count else None,
        mse=accumulated.mse, cosine=accumulated.cosine, max_abs_error=accumulated.max_abs_error,
        weight_sqnr_db=sqnr_db(float_weight, int8_weight.dequantize()) if has_weight else None,
        weight_range_ratio=channel_range_ratio(float_weight) if has_weight else None,
        activation_min=errors.activation.minimum, activation_max=errors.activation.maximum,
        outlier_ratio=errors.activation.outlier_ratio,
        input_scale=grid[0] if grid else None, input_zero_point=grid[1] if grid else None,
        # a dynamic layer returns float: no output grid
        output_scale=float(getattr(pair.int8_module, "scale", math.nan)),
        output_zero_point=int(getattr(pair.int8_module, "zero_point", 0)),
    )


def _rank(rows: list[dict[str, Any]]) -> list[LayerSensitivity]:
    def impact(row: dict[str, Any]) -> tuple[float, float, int]:
        solo = row["solo_sqnr_db"]
        return (math.inf if solo is None else solo, row["sqnr_db"], row["index"])

    ranks = {row["name"]: rank for rank, row in enumerate(sorted(rows, key=impact), start=1)}
    return [LayerSensitivity(impact_rank=ranks[row["name"]], **row) for row in rows]


def sensitivity(model: nn.Module, example_inputs: Any, *, calibration_data: Iterable[Any],
                eval_data: Iterable[Any] | None = None, **quantize_options: Any
                ) -> SensitivityReport | ModuleSensitivityReport:
    """Measure how much int8 quantization costs at every quantized layer of `model`.

    The model is quantized as `fxq.quantize(model, example_inputs, calibration_data=...,
    **quantize_options)` quantizes it; over `eval_data` (default: the calibration data) each layer gets its
    accumulated SQNR (int8 model vs float model at that point), own SQNR (the int8 layer alone, on the
    float input) and solo SQNR (the model's output when only that layer is int8), with error, weight and
    range statistics. End-to-end SQNRs are over all the model's floating-point outputs together. With
    `target_sqnr_db`, the report also carries `recommend(target_sqnr_db)`'s verified choice.
    """
    options = QuantOptions.from_kwargs(**quantize_options)
    if options.mode is Mode.QAT:
        raise ConfigError("fxq.sensitivity analyses post-training quantization; mode='qat' is not supported "
                          "(drop the mode option, or pass mode='dynamic')")
    check_model(model)
    example_inputs = as_example_inputs(example_inputs, model)
    calibration_batches = materialize(positional_batches(model, calibration_data), example_inputs,
                                      options.max_calibration_batches)
    eval_batches = calibration_batches if eval_data is None else \
        _eval_batches(positional_batches(model, eval_data), example_inputs)
    report = analyze(model, example_inputs, calibration_batches, eval_batches,
                     # analyse the all-int8 model (every dynamic layer too, fast or not), then recommend
                     options.replace(target_sqnr_db=None, dynamic_where_faster=False))
    if options.target_sqnr_db is not None:
        start = time.perf_counter()
        report.recommend(options.target_sqnr_db)
        report.timings_s["recommend"] = round(time.perf_counter() - start, 3)
    return report


def analyze(model: nn.Module, example_inputs: Batch, calibration_batches: list[Batch], eval_batches: list[Batch],
            options: QuantOptions) -> SensitivityReport | ModuleSensitivityReport:
    """`sensitivity` on validated inputs: quantize through the pipeline, keeping the float graph it
    quantized as the reference, and run the two side by side on `eval_batches`. A model quantized without
    one graph (dynamic mode, or a forward that does not trace) is measured by module swaps instead
    (analysis.module_sensitivity)."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    run = quantize_model(model, example_inputs, calibration_batches, options, keep_float_graph=True)
    timings["quantize"] = round(time.perf_counter() - start, 3)
    quantized, summary = run.model, summary_of(run.model)
    if run.float_graph is None:
        return analyze_by_swaps(eval_copy(model, example_inputs), quantized, eval_batches, summary.engine)
    reference = run.float_graph.traced.graph
    patterns = {found.nodes[0]: found.pattern for found in run.float_graph.traced.patterns}
    pairs = pair_layers(reference, quantized)
    shadow = run_side_by_side(reference, quantized, pairs, eval_batches, summary.engine,
                              progress=options.progress)
    timings.update(shadow.seconds)
    rows = [_row(pair, index, shadow.layers[pair.name], patterns.get(pair.name)) for index, pair in enumerate(pairs)]
    inputs = _Inputs(model, example_inputs, calibration_batches, eval_batches, options,
                     shadow.reference_outputs, reference, summary.engine, run.float_graph)
    return SensitivityReport(_rank(rows), shadow.end_to_end.sqnr_db, summary.engine, summary.options,
                             len(eval_batches), timings, quantized, inputs)


__all__ = ["sensitivity", "analyze", "SensitivityReport", "LayerSensitivity", "Recommendation"]
