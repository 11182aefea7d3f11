"""fxq's public entry points: validate the arguments once, then dispatch to the pipeline.

The algorithms live in `fxq.pipeline` (one float-graph -> int8 pipeline), `fxq.mixed_precision` (targets)
and `fxq.analysis` (measurements). The user's model is never touched: every step works on a deep copy.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import fx, nn

from fxq import pipeline
from fxq.backend.dynamic_payoff import fastest_engine_for_dynamic, only_dynamic_int8
from fxq.backend.serving import serve_scripted
from fxq.backend.traced_serving import serve_traced
from fxq.backend.op_kinds import WEIGHT_TYPES
from fxq.backend.engine import freeze_bn_stats as _freeze_bn_stats
from fxq.backend.engine import freeze_observers as _freeze_observers
from fxq.calibration import materialize, output_tensors
from fxq.config import Backend, Mode, QuantOptions
from fxq.errors import CalibrationError, ConfigError, InputError
from fxq.frontend.patterns import FoundPattern
from fxq.frontend.trace import FloatLeaf
from fxq.mixed_precision import quantize_to_metric, quantize_to_target
from fxq.shared_inputs import fuse_shared_input_linears, without_members
from fxq.summary import summary_of
from fxq.validate import as_example_inputs, check_model, positional_batches

__all__ = ["quantize", "prepare_qat", "convert", "freeze_observers", "freeze_bn_stats", "inspect", "Inspection"]


def _check_keep_float(model: nn.Module, keep_float: Iterable[Any]) -> None:
    names = {name for name, _ in model.named_modules()}
    for key in keep_float:
        if isinstance(key, str) and key not in names:
            close = [n for n in names if n and (key in n or n in key)][:5]
            raise InputError(f"keep_float names '{key}', which is not a module of this model"
                             + (f"; similar: {', '.join(close)}" if close else ""))
        if not isinstance(key, (str, type)):
            raise InputError(f"keep_float entries are module names or classes, got {key!r}")


def _validated(model: nn.Module, example_inputs: Any, options: QuantOptions) -> tuple[Any, ...]:
    check_model(model)
    example_inputs = as_example_inputs(example_inputs, model)
    _check_keep_float(model, options.keep_float)
    return example_inputs


def quantize(model: nn.Module, example_inputs: Any, *, calibration_data: Iterable[Any] | None = None,
             mode: str = "static", backend: str = "auto", **options: Any) -> nn.Module:
    """Return an int8 copy of `model`: same call signature, float tensors in and out, int8 kernels inside.

    mode="static" calibrates weights and activations on `calibration_data` (an iterable of batches);
    mode="dynamic" quantizes Linear/LSTM/GRU weights and needs no data; QAT goes through `prepare_qat`.
    `example_inputs` and each batch are a Tensor, a tuple of positional inputs or a dict of named ones
    (as Hugging Face models take them). Other keyword arguments are `QuantOptions` fields (observer, keep_float, target_sqnr_db, ...).

    int8 ops dispatch on the global engine (onednn's fused conv + add runs on no other), so
    `torch.backends.quantized.engine` is left set to the engine the returned model was built and checked
    for, whichever way it was built.
    """
    opts = QuantOptions.from_kwargs(mode=mode, backend=backend, **options)
    example_inputs = _validated(model, example_inputs, opts)
    calibration_data = positional_batches(model, calibration_data)
    if opts.mode is Mode.QAT:
        raise ConfigError("mode='qat' trains the model: call fxq.prepare_qat(model, example_inputs), train the "
                          "returned model, then fxq.convert(it)")
    if opts.searches_mixed_precision:
        if calibration_data is None:
            raise CalibrationError("target_sqnr_db / eval_fn measure the int8 model on data: pass calibration_data "
                                   "(an iterable of input batches)")
        batches = materialize(calibration_data, example_inputs, opts.max_calibration_batches)
        base = opts.replace(target_sqnr_db=None, eval_fn=None, max_drop=None)
        if opts.eval_fn is not None:
            quantized = quantize_to_metric(model, example_inputs, batches, opts.eval_fn, opts.max_drop, base)
        else:
            quantized = quantize_to_target(model, example_inputs, batches, opts.target_sqnr_db, base)
    else:
        batches = None if calibration_data is None else materialize(calibration_data, example_inputs,
                                                                      opts.max_calibration_batches)
        quantized = pipeline.quantize_model(model, example_inputs, batches, opts).model
        return _served(quantized, example_inputs, opts, model, batches or [example_inputs])
    return _served(quantized, example_inputs, opts, model)


def _share_inputs(quantized: nn.Module, example_inputs: tuple[Any, ...], options: QuantOptions,
                  float_model: nn.Module, batches: list[tuple[Any, ...]]) -> None:
    """Dynamic int8 Linears that read one tensor run as one kernel where measured to keep their error
    (fxq.shared_inputs), packed for the engine the model was built for; listed in the summary."""
    summary = summary_of(quantized)
    if not options.share_inputs or summary is None or isinstance(quantized, fx.GraphModule):
        return
    start = time.perf_counter()
    joined = fuse_shared_input_linears(quantized, float_model, example_inputs, batches, summary.engine,
                                       options.per_channel_weights)
    summary.rewrites = without_members(summary.rewrites, joined.members) + joined.rewrites
    summary.notes += joined.notes
    summary.timings_s["shared_inputs"] = round(time.perf_counter() - start, 3)


def _served(quantized: nn.Module, example_inputs: tuple[Any, ...], options: QuantOptions,
            float_model: nn.Module | None = None, batches: list[tuple[Any, ...]] | None = None) -> nn.Module:
    """The model as it is handed to the user. A model whose only int8 layers are dynamic moves to the engine
    that runs it fastest (backend.dynamic_payoff; `float_model` says what faithful is); then, given the
    calibration `batches`, Linears reading one tensor are joined (fxq.shared_inputs). A GraphModule runs its
    TorchScript form (backend.serving), any other model a trace per input signature (backend.traced_serving)
    if options.serve_traced. `torch.backends.quantized.engine` is set to the engine it was built and checked
    for."""
    summary = summary_of(quantized)
    if (float_model is not None and options.backend is Backend.AUTO and options.dynamic_where_faster
            and only_dynamic_int8(quantized)):
        start = time.perf_counter()
        with torch.no_grad():
            float_outputs = output_tensors(float_model(*example_inputs))
        fastest, line = fastest_engine_for_dynamic(quantized, example_inputs, summary.engine, float_outputs)
        if fastest != summary.engine:
            summary.engine, summary.engine_reason = fastest, line
        else:
            summary.notes.append(line)
        summary.timings_s["dynamic_engine"] = round(time.perf_counter() - start, 3)
    torch.backends.quantized.engine = summary.engine
    if float_model is not None and batches:
        _share_inputs(quantized, example_inputs, options, float_model, batches)
    start = time.perf_counter()
    if isinstance(quantized, fx.GraphModule):
        summary.notes.append(serve_scripted(quantized, example_inputs, summary.engine))
    elif options.serve_traced:
        summary.notes.append(serve_traced(quantized, example_inputs, summary.engine))
    summary.timings_s["serving"] = round(time.perf_counter() - start, 3)
    return quantized


# --- quantization-aware training -------------------------------------------------------------------

# the pipeline's record of each prepared model, and its example inputs (the converted model is checked on them)
_QAT_RUNS: "weakref.WeakKeyDictionary[nn.Module, tuple[pipeline.QatRun, tuple[Any, ...]]]" = weakref.WeakKeyDictionary()


def prepare_qat(model: nn.Module, example_inputs: Any, backend: str = "auto", **options: Any) -> nn.Module:
    """A trainable copy of `model` with fake quantization (BN folded during training).

    Train it as usual; `freeze_observers` and `freeze_bn_stats` implement the standard recipe's late
    epochs; `convert` returns the int8 model.
    """
    opts = QuantOptions.from_kwargs(mode="qat", backend=backend, **options)
    example_inputs = _validated(model, example_inputs, opts)
    prepared, run = pipeline.prepare_qat_model(model, example_inputs, opts)
    _QAT_RUNS[prepared] = (run, example_inputs)
    return prepared


def freeze_observers(qat_model: nn.Module) -> nn.Module:
    """Stop updating quantization ranges in a model from `prepare_qat` (in place; returns it)."""
    return _freeze_observers(qat_model)


def freeze_bn_stats(qat_model: nn.Module) -> nn.Module:
    """Stop updating BatchNorm running statistics in a model from `prepare_qat` (in place; returns it)."""
    return _freeze_bn_stats(qat_model)


def convert(prepared: nn.Module) -> nn.Module:
    """The int8 model of a trained `prepare_qat` model (the prepared model itself is left as it is).

    A model wrapped for training in DistributedDataParallel or DataParallel is unwrapped first.
    """
    if isinstance(prepared, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        prepared = prepared.module
    if prepared not in _QAT_RUNS:
        raise InputError("fxq.convert takes the model returned by fxq.prepare_qat (after training); "
                         "for post-training quantization call fxq.quantize")
    run, example_inputs = _QAT_RUNS[prepared]
    return _served(pipeline.convert_qat(prepared, run), example_inputs, run.options)


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
    example_inputs = as_example_inputs(example_inputs, model)
    patterns, leaves, graphs = pipeline.inspect_model(model, example_inputs)
    counts: dict[str, int] = {}
    for module in (m for graph in graphs for _, m in graph.named_modules()):
        if isinstance(module, WEIGHT_TYPES):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return Inspection(patterns, leaves, counts)
