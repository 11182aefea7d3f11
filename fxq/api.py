"""fxq's public entry points: thin orchestration of front end -> recovery -> engine, nothing clever.

The user's model is never touched: every step works on a deep copy in eval mode (PTQ) or train mode (QAT).
"""

from __future__ import annotations

import copy
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import fx, nn

from fxq.analysis.shadow import output_tensors
from fxq.backend import engine
from fxq.calibration import Batch, first_nonfinite_module, materialize, outputs, run_batches
from fxq.config import Mode, QuantOptions
from fxq.errors import CalibrationError, ConfigError, InputError
from fxq.frontend.patterns import FoundPattern, find_patterns
from fxq.frontend.rewrite import fold_batchnorm, fuse_clamping_activations
from fxq.frontend.trace import FloatLeaf, trace_model
from fxq.kernel_choice import convert_on_most_faithful_engine
from fxq.recovery.bias_correction import correct_biases
from fxq.recovery.equalization import equalize
from fxq.recovery.rounding import optimize_rounding
from fxq.summary import QuantizationSummary, attach
from fxq.validate import as_example_inputs, check_model, run_example


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Fix torch's RNG for the run (bit-identical results) without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)


def _check_keep_float(model: nn.Module, keep_float: Iterable[Any]) -> None:
    names = {name for name, _ in model.named_modules()}
    for key in keep_float:
        if isinstance(key, str) and key not in names:
            close = [n for n in names if n and (key in n or n in key)][:5]
            raise InputError(f"keep_float names '{key}', which is not a module of this model"
                             + (f"; similar: {', '.join(close)}" if close else ""))
        if not isinstance(key, (str, type)):
            raise InputError(f"keep_float entries are module names or classes, got {key!r}")


def _check_float_outputs(work: nn.Module, batches: list[Batch]) -> None:
    """Every calibration batch must run through the float model and give finite outputs."""
    for index, batch in enumerate(batches):
        try:
            (output,) = outputs(work, [batch])
        except Exception:  # rerun with hooks to name the module that rejects the batch
            run_example(work, batch, what=f"calibration batch {index}")
            raise
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in output_tensors(output)):
            where = first_nonfinite_module(work, batch) or "the model's own forward"
            raise CalibrationError(f"{where}: produces NaN or Inf on calibration batch {index}; fix the "
                                   "model or the data (int8 ranges cannot be computed from non-finite values)")


def _float_layers_after(quantized: nn.Module, leaves: list[FloatLeaf],
                        keep_float: Iterable[Any]) -> list[tuple[str, str]]:
    listed = [(leaf.module, f"untraceable: {leaf.reason}") for leaf in leaves]
    covered = {name for name, _ in listed}
    for name, module in quantized.named_modules():
        if isinstance(module, engine.WEIGHT_TYPES) and not any(name == c or name.startswith(c + ".") for c in covered):
            why = "keep_float" if any(name == k or name.startswith(f"{k}.") if isinstance(k, str)
                                      else isinstance(module, k) for k in keep_float) else "no int8 pattern"
            listed.append((name, why))
    return listed


def _summary(options: QuantOptions, choice: engine.EngineChoice, **fields: Any) -> QuantizationSummary:
    return QuantizationSummary(options=options.describe(), engine=choice.engine, engine_reason=choice.reason,
                               reduce_range=choice.reduce_range, kernel_saturates=choice.kernel_saturates,
                               **fields)


def quantize(model: nn.Module, example_inputs: Any, *, calibration_data: Iterable[Any] | None = None,
             mode: str = "static", backend: str = "auto", **options: Any) -> nn.Module:
    """Return an int8 copy of `model`: same call signature, float tensors in and out, int8 kernels inside.

    mode="static" calibrates weights and activations on `calibration_data` (an iterable of batches);
    mode="dynamic" quantizes Linear/LSTM/GRU weights and needs no data; QAT goes through `prepare_qat`.
    Other keyword arguments are `QuantOptions` fields (observer, keep_float, target_sqnr_db, ...).
    """
    opts = QuantOptions.from_kwargs(mode=mode, backend=backend, **options)
    check_model(model)
    example_inputs = as_example_inputs(example_inputs)
    if opts.mode is Mode.QAT:
        raise ConfigError("mode='qat' trains the model: call fxq.prepare_qat(model, example_inputs), train the "
                          "returned model, then fxq.convert(it)")
    _check_keep_float(model, opts.keep_float)
    choice = engine.select_engine(opts)
    timer = _Timer()
    with _seeded(opts.seed), engine.using_engine(choice.engine):
        work = copy.deepcopy(model).eval()
        run_example(work, example_inputs)
        with timer.step("trace"):
            gm, leaves = trace_model(work)
            patterns = find_patterns(gm)
        non_traceable = [leaf.module for leaf in leaves]
        if opts.mode is Mode.DYNAMIC:
            with timer.step("convert"):
                prepared = engine.prepare_dynamic(gm, example_inputs, opts, choice, non_traceable)
                quantized = engine.convert(prepared, choice)
            attach(quantized, _summary(opts, choice, patterns=[str(p) for p in patterns],
                                       float_layers=[(l.module, f"untraceable: {l.reason}") for l in leaves],
                                       timings_s=timer.seconds))
            return quantized
        if opts.target_sqnr_db is not None:
            from fxq.recovery.mixed_precision import quantize_to_target

            batches = materialize(calibration_data, example_inputs, opts.max_calibration_batches)
            options.pop("target_sqnr_db")
            return quantize_to_target(model, example_inputs, batches, opts.target_sqnr_db,
                                      dict(options, mode=mode, backend=backend))
        quantized, summary = _quantize_static(work, gm, example_inputs, calibration_data, opts, choice,
                                              leaves, patterns, timer)
    attach(quantized, summary)
    # int8 ops dispatch on the global engine: leave it set to the one this model was built and checked for
    torch.backends.quantized.engine = summary.engine
    return quantized


def _quantize_static(work: nn.Module, gm: fx.GraphModule, example_inputs: Batch,
                     calibration_data: Iterable[Any] | None, opts: QuantOptions, choice: engine.EngineChoice,
                     leaves: list[FloatLeaf], patterns: list[FoundPattern],
                     timer: _Timer) -> tuple[nn.Module, QuantizationSummary]:
    batches = materialize(calibration_data, example_inputs, opts.max_calibration_batches)
    _check_float_outputs(work, batches)
    non_traceable = [leaf.module for leaf in leaves]
    keep_float = list(opts.keep_float)
    with timer.step("rewrite"):
        rewrites = fold_batchnorm(gm) + fuse_clamping_activations(gm)
    equalized, corrected = [], []
    float_names = {k for k in keep_float if isinstance(k, str)}
    if opts.equalize:
        with timer.step("equalize"):
            equalized = equalize(gm, batches)
    rounded = {}
    if opts.optimize_rounding:
        with timer.step("rounding"):
            rounded = optimize_rounding(gm, batches, opts.per_channel_weights, skip=float_names)
    if opts.bias_correction:
        with timer.step("bias_correction"):
            corrected = correct_biases(gm, batches, opts.per_channel_weights, skip=float_names,
                                       quantized_weights={name: r.values for name, r in rounded.items()})
    with timer.step("prepare"):
        mapping = engine.build_static_qconfig_mapping(gm, opts, choice)
        prepared = engine.prepare_static(gm, mapping, example_inputs, choice, non_traceable)
    with timer.step("calibrate"):
        run_batches(prepared, batches, progress=opts.progress)
    with timer.step("convert"):
        quantized, choice, fidelity = convert_on_most_faithful_engine(prepared, opts, choice, batches[0])
        engine.install_weights(quantized, {name: (r.values, r.scale) for name, r in rounded.items()}, choice)
    summary = _summary(
        opts, choice, engine_fidelity_db=fidelity, patterns=[str(p) for p in patterns],
        rewrites=[f"{r.kind}: {' + '.join(r.modules)}" for r in rewrites],
        float_layers=_float_layers_after(quantized, leaves, keep_float),
        equalized_pairs=len(equalized), bias_corrected_layers=len(corrected), rounded_layers=len(rounded), timings_s=timer.seconds)
    return quantized, summary


# --- quantization-aware training -------------------------------------------------------------------

_QAT_STATE: "weakref.WeakKeyDictionary[nn.Module, tuple[QuantOptions, engine.EngineChoice, list[FloatLeaf]]]" = \
    weakref.WeakKeyDictionary()


def prepare_qat(model: nn.Module, example_inputs: Any, backend: str = "auto", **options: Any) -> nn.Module:
    """A trainable copy of `model` with fake quantization (BN folded during training).

    Train it as usual; `freeze_observers` and `freeze_bn_stats` implement the standard recipe's late
    epochs; `convert` returns the int8 model.
    """
    opts = QuantOptions.from_kwargs(mode="qat", backend=backend, **options)
    check_model(model)
    example_inputs = as_example_inputs(example_inputs)
    _check_keep_float(model, opts.keep_float)
    choice = engine.select_engine(opts)
    with _seeded(opts.seed):
        work = copy.deepcopy(model).eval()
        run_example(work, example_inputs)
        _, leaves = trace_model(work)
        work.train()
        prepared = engine.prepare_qat(work, example_inputs, choice, opts.keep_float, [l.module for l in leaves])
    _QAT_STATE[prepared] = (opts, choice, leaves)
    return prepared


def freeze_observers(qat_model: nn.Module) -> nn.Module:
    """Stop updating quantization ranges in a model from `prepare_qat` (in place; returns it)."""
    return engine.freeze_observers(qat_model)


def freeze_bn_stats(qat_model: nn.Module) -> nn.Module:
    """Stop updating BatchNorm running statistics in a model from `prepare_qat` (in place; returns it)."""
    return engine.freeze_bn_stats(qat_model)


def convert(prepared: nn.Module) -> nn.Module:
    """The int8 model of a trained `prepare_qat` model (the prepared model itself is left as it is)."""
    if prepared not in _QAT_STATE:
        raise InputError("fxq.convert takes the model returned by fxq.prepare_qat (after training); "
                         "for post-training quantization call fxq.quantize")
    opts, choice, leaves = _QAT_STATE[prepared]
    trained = copy.deepcopy(prepared).eval()
    quantized = engine.convert(trained, choice)
    attach(quantized, _summary(opts, choice, float_layers=_float_layers_after(quantized, leaves, opts.keep_float)))
    return quantized


# --- inspection ----------------------------------------------------------------------------------

@dataclass
class Inspection:
    """What the front end sees in a model before quantizing it."""

    patterns: list[FoundPattern]
    float_leaves: list[FloatLeaf]
    layer_counts: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        from tabulate import tabulate

        rows = [[p.pattern, " -> ".join(p.nodes)] for p in self.patterns]
        text = tabulate(rows, headers=["pattern", "nodes"]) if rows else "no patterns found"
        if self.float_leaves:
            text += "\n\nkept in float (untraceable):\n" + tabulate(
                [[leaf.module, leaf.reason] for leaf in self.float_leaves], headers=["module", "reason"])
        return text


def inspect(model: nn.Module, example_inputs: Any) -> Inspection:
    """Trace a copy of `model` and list the fusible patterns and the submodules that must stay float."""
    check_model(model)
    example_inputs = as_example_inputs(example_inputs)
    work = copy.deepcopy(model).eval()
    run_example(work, example_inputs)
    gm, leaves = trace_model(work)
    counts: dict[str, int] = {}
    for _, module in gm.named_modules():
        if isinstance(module, engine.WEIGHT_TYPES):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return Inspection(find_patterns(gm), leaves, counts)
