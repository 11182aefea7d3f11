"""Float vs int8 side by side: size, latency, output error and what was (not) quantized.

    print(fxq.report(model, qmodel, example_inputs, eval_data=batches))

The quantized model may be the module `fxq.quantize` returned or a model loaded with `fxq.load`; the
structure section comes from `fxq.summary_of` when fxq built (or saved) the model.
"""

from __future__ import annotations

import copy

import io
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from fxq.backend.op_kinds import weighted_layers
from fxq.calibration import as_args
from fxq.report.latency import LatencyRow, measure_latency
from fxq.summary import summary_of
from fxq.validate import as_example_inputs

INT8_MODULE_PREFIXES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")


@dataclass
class SizeComparison:
    float_parameters: int
    int8_parameters: int
    float_mb: float
    int8_mb: float

    @property
    def ratio(self) -> float:
        """int8 file size / float file size."""
        return self.int8_mb / self.float_mb if self.float_mb > 0 else float("nan")


@dataclass
class OutputError:
    """Int8 output against the float output on the evaluation data, all output tensors flattened."""

    sqnr_db: float
    max_abs_error: float
    cosine: float
    # Fraction of rows whose argmax agrees, when the output is a 2-D logits tensor; else None.
    top1_agreement: float | None
    samples: int


@dataclass
class Structure:
    int8_modules: int
    float_weight_layers: list[str]
    engine: str | None
    engine_reason: str | None
    reduce_range: bool | None
    patterns: list[str] = field(default_factory=list)
    float_layers: list[tuple[str, str]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    float_ops: list[tuple[str, str]] = field(default_factory=list)
    conversions: dict[str, int] = field(default_factory=dict)
    estimated_latency_us: dict[str, float] = field(default_factory=dict)
    int8_layers: int = 0  # conv/linear calls that run int8 kernels
    seven_bit_weights: bool | None = None
    # output channels that keep 8-bit weights where the rest have 7 (backend.weight_bits), and their layers
    eight_bit_weight_channels: int = 0
    eight_bit_weight_layers: int = 0
    range_choices: dict[str, str] = field(default_factory=dict)  # activation -> chosen range rule


@dataclass
class Report:
    size: SizeComparison
    latency: list[LatencyRow]
    error: OutputError
    structure: Structure

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": {**asdict(self.size), "ratio": round(self.size.ratio, 4)},
            "latency": [row.to_dict() for row in self.latency],
            "error": asdict(self.error),
            "structure": {**asdict(self.structure),
                          "float_layers": [list(pair) for pair in self.structure.float_layers],
                          "float_ops": [list(pair) for pair in self.structure.float_ops]},
        }

    def to_json(self, indent: int | None = 2) -> str:
        # Python's json writes an infinite SQNR (identical outputs) as Infinity, which json.loads reads back.
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        return self._render("pipe", heading="### ")

    def __str__(self) -> str:
        return self._render("simple", heading="")

    def _render(self, tablefmt: str, heading: str) -> str:
        from tabulate import tabulate

        size, error, structure = self.size, self.error, self.structure
        sections = [
            ("size", tabulate([["parameters", f"{size.float_parameters:,}", f"{size.int8_parameters:,}", ""],
                               ["serialized MB", f"{size.float_mb:.3f}", f"{size.int8_mb:.3f}",
                                f"{size.ratio:.3f}"]],
                              headers=["", "float", "int8", "int8/float"], tablefmt=tablefmt,
                              disable_numparse=True)),
            ("latency (ms)", tabulate(
                [[r.batch_size, r.threads, r.float_median_ms, r.float_p90_ms, r.int8_median_ms, r.int8_p90_ms,
                  f"{r.speedup:.2f}x"] for r in self.latency],
                headers=["batch", "threads", "float median", "float p90", "int8 median", "int8 p90", "speedup"],
                tablefmt=tablefmt)),
            (f"error (int8 vs float, {error.samples} samples)", tabulate(
                [["SQNR dB", f"{error.sqnr_db:.2f}"], ["max abs error", f"{error.max_abs_error:.4g}"],
                 ["cosine", f"{error.cosine:.6f}"],
                 ["top-1 agreement", "n/a" if error.top1_agreement is None else f"{error.top1_agreement:.4f}"]],
                headers=["metric", "value"], tablefmt=tablefmt)),
            ("structure", tabulate(
                [["int8 modules", structure.int8_modules],
                 ["int8 conv/linear calls", structure.int8_layers],
                 ["float conv/linear left", len(structure.float_weight_layers)],
                 ["backend", structure.engine or "unknown (no fxq summary)"],
                 ["backend reason", structure.engine_reason or ""],
                 ["activation / weight bits", "unknown" if structure.reduce_range is None else
                  f"{7 if structure.reduce_range else 8} / {_weight_bits(structure)}"]]
                + ([["quantize / dequantize per call",
                     f"{structure.conversions.get('quantize', 0)} / {structure.conversions.get('dequantize', 0)}"]]
                   if structure.conversions else [])
                + ([["activation ranges chosen", ", ".join(
                    f"{rule} {count}" for rule, count in Counter(structure.range_choices.values()).most_common())]]
                   if structure.range_choices else [])
                + [[f"pattern {name}", count] for name, count in _pattern_counts(structure.patterns).items()],
                tablefmt=tablefmt)),
        ]
        if structure.float_layers or structure.float_ops:
            sections.append(("what falls back to float", fallback_table(structure, tablefmt)))
        if structure.options:
            sections.append(("options", tabulate([[k, v] for k, v in structure.options.items()],
                                                 headers=["option", "value"], tablefmt=tablefmt)))
        return "\n\n".join(f"{heading}{title}\n{table}" for title, table in sections)


def fallback_table(structure: Structure, tablefmt: str = "simple") -> str:
    """Conv/linear layers and other ops that run in float in the int8 model, each with the reason, and the
    cost model's latency estimates when fxq planned float islands."""
    from tabulate import tabulate

    rows = [["layer", name, why] for name, why in structure.float_layers]
    rows += [["ops", ops, why] for ops, why in structure.float_ops]
    widths = None if tablefmt == "pipe" else [None, 60, 70]  # markdown cells cannot wrap
    text = tabulate(rows, headers=["kind", "what", "why"], tablefmt=tablefmt, maxcolwidths=widths)
    if structure.estimated_latency_us:
        estimates = ", ".join(f"{name} {value / 1000:.2f} ms" for name, value in structure.estimated_latency_us.items())
        text += f"\n\ncost model estimate of the quantizable ops and conversions: {estimates}"
    return text


def _weight_bits(structure: Structure) -> str:
    if not structure.seven_bit_weights:
        return "8"
    if not structure.eight_bit_weight_channels:
        return "7"
    return (f"7 (8 in {structure.eight_bit_weight_channels} output channel(s) of {structure.eight_bit_weight_layers} "
            "layer(s) measured not to saturate)")


def _pattern_counts(patterns: Sequence[str]) -> dict[str, int]:
    return dict(Counter(p.split(":", 1)[0] for p in patterns))


def _type_path(module: nn.Module) -> str:
    """Dotted class path of a module; for TorchScript modules (fxq.load) the path of the scripted class."""
    if isinstance(module, torch.jit.ScriptModule):
        return module._c._type().qualified_name().removeprefix("__torch__.")
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _serialized_mb(write: Any) -> float:
    buffer = io.BytesIO()
    write(buffer)
    return buffer.getbuffer().nbytes / 1e6


def compare_size(float_model: nn.Module, quantized_model: nn.Module) -> SizeComparison:
    """Parameter counts and serialized sizes (float: state_dict via torch.save; int8: TorchScript)."""
    float_parameters = sum(p.numel() for p in float_model.parameters())
    # int8 weights live in packed params, not nn.Parameters: count the tensors of the state_dict instead,
    # leaving out per-tensor scale / zero-point scalars.
    int8_parameters = sum(t.numel() for t in quantized_model.state_dict().values()
                          if isinstance(t, torch.Tensor) and t.dim() > 0
                          and (t.is_quantized or t.is_floating_point()))
    float_mb = _serialized_mb(lambda buffer: torch.save(float_model.state_dict(), buffer))
    scripted = quantized_model if isinstance(quantized_model, torch.jit.ScriptModule) \
        else torch.jit.script(quantized_model.eval())
    int8_mb = _serialized_mb(lambda buffer: torch.jit.save(scripted, buffer))
    return SizeComparison(float_parameters, int8_parameters, round(float_mb, 4), round(int8_mb, 4))


def _flat_tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for key in output for t in _flat_tensors(output[key])]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in _flat_tensors(value)]
    return []


def measure_error(float_model: nn.Module, quantized_model: nn.Module,
                  eval_batches: Iterable[Any]) -> OutputError:
    """SQNR, max abs error and cosine over all float output elements; top-1 agreement for 2-D logits."""
    float_values, int8_values, agreements, samples = [], [], [], 0
    logits = True
    with torch.inference_mode():
        for batch in eval_batches:
            args = as_args(batch)
            float_out, int8_out = float_model(*args), quantized_model(*args)
            float_tensors = [t for t in _flat_tensors(float_out) if t.is_floating_point()]
            int8_tensors = [t for t in _flat_tensors(int8_out) if t.is_floating_point()]
            if len(float_tensors) != len(int8_tensors) or not float_tensors:
                raise ValueError(f"float and int8 models return different outputs ({len(float_tensors)} vs "
                                 f"{len(int8_tensors)} float tensors); compare models with the same signature")
            float_values += [t.reshape(-1).float() for t in float_tensors]
            int8_values += [t.reshape(-1).float() for t in int8_tensors]
            first = args[0]
            samples += first.shape[0] if isinstance(first, torch.Tensor) and first.dim() > 0 else 1
            logits = logits and isinstance(float_out, torch.Tensor) and float_out.dim() == 2
            if logits:
                agreements.append(float_out.argmax(1) == int8_out.argmax(1))
    reference, approximation = torch.cat(float_values), torch.cat(int8_values)
    noise = (reference - approximation).norm()
    sqnr = float("inf") if noise == 0 else float(20 * torch.log10(reference.norm() / noise))
    cosine = float(torch.nn.functional.cosine_similarity(reference, approximation, dim=0))
    top1 = float(torch.cat(agreements).float().mean()) if logits and agreements else None
    return OutputError(round(sqnr, 3) if math.isfinite(sqnr) else sqnr,
                       float((reference - approximation).abs().max()), cosine, top1, samples)


def describe_structure(quantized_model: nn.Module) -> Structure:
    int8_modules = sum(1 for _, module in quantized_model.named_modules()
                       if _type_path(module).startswith(INT8_MODULE_PREFIXES)
                       and not _type_path(module).endswith("PackedParams"))
    layers = weighted_layers(quantized_model)  # conv/linear calls, functional and inside float leaves too
    summary = summary_of(quantized_model)
    if summary is None:
        return Structure(int8_modules, layers.float, None, None, None, int8_layers=len(layers.int8))
    return Structure(int8_modules, layers.float, summary.engine, summary.engine_reason,
                     summary.reduce_range, list(summary.patterns),
                     [tuple(pair) for pair in summary.float_layers], dict(summary.options),
                     [tuple(pair) for pair in summary.float_ops], dict(summary.conversions),
                     dict(summary.estimated_latency_us), len(layers.int8), summary.seven_bit_weights,
                     sum(map(len, summary.eight_bit_weight_channels.values())),
                     len(summary.eight_bit_weight_channels), dict(summary.observer_choices))


def report(float_model: nn.Module, quantized_model: nn.Module, example_inputs: Any, *,
           eval_data: Iterable[Any] | None = None, batch_sizes: Sequence[int] = (1,),
           threads: int | None = None) -> Report:
    """Compare `quantized_model` with `float_model`: size, latency, output error on `eval_data`, structure.

    `eval_data` is an iterable of batches (default: the example inputs as one batch); `threads` sets
    torch's intra-op threads for the timing only.
    """
    example_inputs = as_example_inputs(example_inputs)
    if isinstance(eval_data, torch.Tensor):
        eval_data = [eval_data]
    eval_batches = [example_inputs] if eval_data is None else list(eval_data)
    if not eval_batches:
        raise ValueError("eval_data is empty; pass at least one batch or leave it None")
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes={tuple(batch_sizes)} must be positive")
    if float_model.training:  # never flip the user's model to eval: measure an eval copy
        float_model = copy.deepcopy(float_model).eval()
    if quantized_model.training:
        quantized_model = copy.deepcopy(quantized_model).eval()
    return Report(size=compare_size(float_model, quantized_model),
                  latency=measure_latency(float_model, quantized_model, example_inputs,
                                          batch_sizes=batch_sizes, threads=threads),
                  error=measure_error(float_model, quantized_model, eval_batches),
                  structure=describe_structure(quantized_model))
