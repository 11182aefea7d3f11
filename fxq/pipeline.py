"""The one float-model -> int8-model pipeline: `fxq.quantize`, `fxq.sensitivity`, the mixed-precision
search and bench/ all run it, so what they measure is what users get.

    trace_float_graph   copy in eval mode, trace, open up (attention, in-place ops, eval identities), patterns
    build_float_graph   fold BatchNorm, fuse clamps, pick the engine for the graph, equalize (each checked
                        against the float model's outputs)
    quantize_model      ... then plan float islands, prepare, calibrate, measure weight bits, round, correct
                        on the float simulation, convert on the most faithful engine, finish

A model whose own forward does not trace goes through `fxq.regions` (its traceable submodules, each
through this pipeline). The user's model is never touched: every step works on a deep copy.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import fx, nn

from fxq import regions
from fxq.analysis.metrics import ErrorStats
from fxq.backend import engine
from fxq.backend.conv_add import fusable_convs, fused_layers
from fxq.backend.depthwise_times import fbgemm_depthwise_times, slow_fbgemm_depthwise
from fxq.backend.dynamic_payoff import dynamic_layers, keep_float_where_slower
from fxq.backend.float_layout import clamp_float_layer_outputs_in_place, run_float_convs_channels_last
from fxq.backend.float_outputs import dynamic_output_linears
from fxq.backend.kernel_choice import convert_on_most_faithful_engine, engine_for_graph
from fxq.backend.op_kinds import RECURRENT_TYPES, count_conversions, quantizes_op, weighted_layers
from fxq.backend.weight_bits import measured_weight_grid
from fxq.calibration import (Batch, OutputCheck, channels_last_batches, check_example_outputs, few_samples_note,
                             materialize, output_tensors, run_batches)
from fxq.config import Mode, QuantOptions, covered_modules, key_covers
from fxq.errors import CalibrationError, FxqError, TraceError
from fxq.frontend.canonicalize import canonicalize_layers
from fxq.frontend.decompose import decompose_attention, may_decompose
from fxq.frontend.graph import replace_module, restore_output_type
from fxq.frontend.identities import remove_eval_identities
from fxq.frontend.inplace import check_state_kept, describe_rewrites, remove_inplace_ops, state_versions
from fxq.frontend.islands import find_float_islands, keep_islands_float
from fxq.frontend.patterns import FoundPattern, find_patterns
from fxq.frontend.rewrite import fold_batchnorm, fuse_clamping_activations
from fxq.frontend.trace import FloatLeaf, trace_model
from fxq.recovery.equalization import equalize
from fxq.recovery.layers import copy_biases
from fxq.recovery.smoothing import choose_smoothing
from fxq.recovery.simulation_pass import recover_on_simulation
from fxq.summary import QuantizationSummary, attach, summary_of
from fxq.summary.assembly import (dynamic_output_rewrites, engine_summary, float_layers_after, float_ops,
                                  regions_summary, untraceable_ops, with_parts)
from fxq.validate import run_example

# A rewrite of the float graph changes float rounding only (equalization rescales channels): its outputs
# stay above this SQNR against the model's, or the rewrite lost or changed an op.
MIN_REWRITE_SQNR_DB = 60.0
# A few float32 ulps of relative input change: what float rounding alone does to a model's inputs. A model
# whose outputs then move below MIN_REWRITE_SQNR_DB (a random-weight LeViT: 9 dB) has its rewrites checked
# against that floor, less NOISE_FLOOR_MARGIN_DB.
INPUT_NUDGE = 2.0 ** -21
NOISE_FLOOR_MARGIN_DB = 6.0


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Fix torch's RNG for the run (bit-identical results) without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class Timer:
    """Wall-clock seconds per pipeline step, for the summary's `timings_s`; with `progress`, each step shows
    a line with its running time while it runs (options.progress; the CLI turns it on)."""

    def __init__(self, progress: bool = False) -> None:
        self.seconds: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        line = None
        if self.progress:
            from tqdm.auto import tqdm

            line = tqdm(total=None, desc=f"fxq {name}", bar_format="{desc} [{elapsed}]", mininterval=1.0)
        try:
            yield
        finally:
            if line is not None:
                line.close()
        self.seconds[name] = round(time.perf_counter() - start, 3)


@dataclass
class TracedModel:
    """The user's model as fxq works on it: an eval (or train, for QAT) copy and its traced graph."""

    work: nn.Module
    graph: fx.GraphModule
    leaves: list[FloatLeaf]  # untraceable submodules, called as opaque float code
    rewrites: list[str]  # what opening up the graph did, described
    patterns: list[FoundPattern] = field(default_factory=list)
    # the float model's output tensors on the example inputs, taken before any rewrite (eval mode only)
    expected_outputs: list[torch.Tensor] = field(default_factory=list)
    # their SQNR when the float inputs move by float rounding (`float_noise_floor_db`), taken then too: the
    # rewrites change modules that the graph shares with `work`
    noise_floor_db: float = float("inf")


@dataclass
class FloatGraph:
    """The float graph that gets quantized: BatchNorm folded, clamps fused, channels equalized."""

    traced: TracedModel
    choice: engine.EngineChoice  # the engine chosen for this graph
    rewrites: list[str]  # fold and fuse rewrites, described
    equalized_pairs: int
    # the calibration batches as fxq's own passes over the graph take them (calibration.channels_last_batches)
    pass_batches: list[Batch]
    # fbgemm_depthwise_times(graph, example inputs, "x86") when the engine choice timed them, else None
    x86_depthwise_us: dict[str, tuple[float, float]] | None = None

    def depthwise_times_us(self, example_inputs: Batch) -> dict[str, tuple[float, float]]:
        """fbgemm_depthwise_times on the chosen engine, reusing the engine choice's timings (shapes do not
        change after it, only equalized weights)."""
        if self.choice.engine == "x86" and self.x86_depthwise_us is not None:
            return self.x86_depthwise_us
        return fbgemm_depthwise_times(self.traced.graph, example_inputs, self.choice.engine)


@dataclass
class PipelineResult:
    model: nn.Module
    # with keep_float_graph: a copy of the float graph before prepare (None for a model quantized by regions)
    float_graph: FloatGraph | None = None


def eval_copy(model: nn.Module, example_inputs: Batch) -> nn.Module:
    """A deep copy of `model` in eval mode, run once on the example inputs (which must not write its state)."""
    work = copy.deepcopy(model).eval()
    versions = state_versions(work)
    run_example(work, example_inputs)
    check_state_kept(work, versions)
    return work


def trace_float_graph(work: nn.Module, example_inputs: Batch) -> TracedModel:
    """Trace `work` and open the graph up (`open_up`). Raises TraceError when the model's own forward does
    not trace, or when it mutates a tensor in a way the int8 model could not repeat."""
    gm, leaves = trace_model(work)
    return open_up(work, gm, leaves, example_inputs)


def open_up(work: nn.Module, gm: fx.GraphModule, leaves: list[FloatLeaf], example_inputs: Batch) -> TracedModel:
    """Open the traced graph up: attention blocks that hide their linear layers are decomposed
    (re-traced), in-place ops made out of place (torch.ao's convert would drop those whose result is
    unused; a mutation the caller could observe raises TraceError) and eval-mode no-ops dropped. In train
    mode (QAT) a forward would update BatchNorm statistics, so attention is left as it is."""
    if work.training:
        return TracedModel(work, gm, leaves, describe_rewrites(remove_inplace_ops(gm)), find_patterns(gm))
    with torch.no_grad():  # before any rewrite: clearing an inplace flag changes the shared module in `work` too
        expected = output_tensors(work(*example_inputs))
    noise_floor = float_noise_floor_db(work, example_inputs, expected)  # before rewrites change shared modules
    decomposed = []
    if may_decompose(work):
        def same_outputs() -> bool:
            with torch.no_grad():
                actual = output_tensors(work(*example_inputs))
            return len(actual) == len(expected) and all(
                a.shape == e.shape and torch.allclose(a, e, rtol=1e-4, atol=1e-5) for a, e in zip(actual, expected))

        decomposed = decompose_attention(work, gm, same_outputs)
    if any(d.applied for d in decomposed):
        gm, leaves = trace_model(work)
    rewrites = [f"decompose: {d.module} ({d.kind})" if d.applied else
                f"decompose not applied: {d.module} ({d.kind} changed the outputs on the example inputs)"
                for d in decomposed]
    rewrites += describe_rewrites(remove_inplace_ops(gm))
    removed = remove_eval_identities(gm)
    if removed:
        rewrites.append(f"drop_eval_identity: {len(removed)} ops that return their input in eval mode "
                        f"({', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''})")
    # third-party layer code (SAME-padded conv subclasses, functional convs, shared activations) made to
    # look like torchvision's, each rewrite checked against the float outputs; leaves it opened are traced
    canonical = canonicalize_layers(gm, example_inputs)
    opened = {record.modules[0] for record in canonical if record.applied and record.kind == "specialize_shapes"}
    leaves = [leaf for leaf in leaves if leaf.module not in opened]
    rewrites += [str(record) for record in canonical if record.kind != "views_as_reshapes"]
    views = [record.nodes[0] for record in canonical if record.kind == "views_as_reshapes" and record.applied]
    if views:
        rewrites.append(f"views_as_reshapes: {len(views)} x.view calls run as x.reshape, since int8 convs return "
                        f"channels-last tensors ({', '.join(views[:3])}{', ...' if len(views) > 3 else ''})")
    return TracedModel(work, gm, leaves, rewrites, find_patterns(gm), expected, noise_floor)


def _check_function(expected: list[torch.Tensor], traced: TracedModel, example_inputs: Batch, step: str,
                    hint: str, error: type[FxqError] = FxqError) -> str:
    """Raise `error` unless the traced graph reproduces the float model's outputs after `step`: to
    MIN_REWRITE_SQNR_DB, or, for a model whose outputs move more than that when its inputs move by float
    rounding (`TracedModel.noise_floor_db`), to that floor. Returns a line for the summary when the floor was
    used."""
    with torch.no_grad():
        actual = output_tensors(traced.graph(*example_inputs))
    stats = ErrorStats()
    if len(expected) == len(actual) and all(e.shape == a.shape for e, a in zip(expected, actual)):
        for e, a in zip(expected, actual):
            stats.update(e, a)
        if stats.sqnr_db >= MIN_REWRITE_SQNR_DB:
            return ""
        floor_db = traced.noise_floor_db
        if stats.sqnr_db >= floor_db - NOISE_FLOOR_MARGIN_DB:
            return (f"{step} checked against the model's own float noise: its outputs move by {floor_db:.1f} dB "
                    f"SQNR when its inputs move by float rounding ({INPUT_NUDGE:g} relative), and the rewritten "
                    f"graph is at {stats.sqnr_db:.1f} dB; a model this ill-conditioned cannot keep its outputs "
                    "in int8 (random weights often are; trained ones rarely)")
    agreement = f"SQNR {stats.sqnr_db:.1f} dB" if stats.count else "outputs of other shapes"
    raise error(f"{type(traced.work).__name__}: after {step} the float graph no longer computes the model's "
                f"outputs on the example inputs ({agreement}); {hint}")


def float_noise_floor_db(work: nn.Module, example_inputs: Batch, expected: list[torch.Tensor]) -> float:
    """SQNR of the float model's outputs against themselves when its float inputs are scaled by 1 +
    INPUT_NUDGE: how far float rounding alone moves them. inf for a model without float inputs."""
    nudged = tuple(value * (1 + INPUT_NUDGE) if isinstance(value, torch.Tensor) and value.is_floating_point()
                   else value for value in example_inputs)
    if all(a is b for a, b in zip(nudged, example_inputs)):
        return float("inf")
    stats = ErrorStats()
    with torch.no_grad():
        for e, a in zip(expected, output_tensors(work(*nudged))):
            stats.update(e, a)
    return stats.sqnr_db


def build_float_graph(traced: TracedModel, example_inputs: Batch, batches: list[Batch], options: QuantOptions,
                      choice: engine.EngineChoice, timer: Timer) -> FloatGraph:
    """Fold BatchNorm, fuse clamps and equalize `traced.graph` in place, each step checked against the
    float model's outputs on the example inputs; the engine choice is settled once the graph is known."""
    gm, expected = traced.graph, traced.expected_outputs
    with timer.step("rewrite"):
        rewrites = fold_batchnorm(gm) + fuse_clamping_activations(gm)
        checks = [_check_function(expected, traced, example_inputs, "tracing, BatchNorm folding and clamp fusion",
                                  "an op was lost or changed in tracing, e.g. an in-place method whose result is "
                                  "unused (x.add_(y)), which FX drops: write x = x + y", TraceError)]
    x86_depthwise_us = None

    def slow_depthwise() -> list[str]:  # timed only when the choice hinges on it; kept for the island planner
        nonlocal x86_depthwise_us
        x86_depthwise_us = fbgemm_depthwise_times(gm, example_inputs, "x86")
        return slow_fbgemm_depthwise(x86_depthwise_us)

    choice = engine_for_graph(choice, options, has_conv_adds=bool(fusable_convs(gm, example_inputs)),
                              fbgemm_depthwise=slow_depthwise)
    pass_batches = channels_last_batches(gm, batches)
    equalized, check = [], OutputCheck(traced.work, batches)
    if options.equalize:
        with timer.step("equalize"):
            try:
                equalized = equalize(gm, pass_batches, check.seen)
            except CalibrationError:
                raise
            except Exception:  # a batch the model rejects: the check names the module
                check.finish()
                raise
            checks.append(_check_function(expected, traced, example_inputs, "cross-layer equalization",
                                          "it should only rescale channels. Pass equalize=False, and please report "
                                          "the model"))
    check.finish()  # the batches equalization did not run (all of them without it)
    return FloatGraph(traced, choice, [f"{r.kind}: {' + '.join(r.modules)}" for r in rewrites]
                      + [line for line in checks if line], len(equalized), pass_batches, x86_depthwise_us)


def quantize_model(model: nn.Module, example_inputs: Batch, calibration_data: Iterable[Any] | None,
                   options: QuantOptions, *, keep_float_graph: bool = False,
                   float_graph: FloatGraph | None = None) -> PipelineResult:
    """Quantize a copy of `model` (static or dynamic; inputs already validated; QAT goes through
    `prepare_qat_model`) and attach its summary.

    With `keep_float_graph`, the result also carries a copy of the float graph that was quantized, for
    measurements against it (fxq.sensitivity). A `float_graph` kept that way, from the same model, example
    inputs, calibration data and options but for keep_float (which tracing, folding and equalization do not
    read), is quantized again (a copy of it) instead of building one: the analyzer's verifications.
    """
    choice = engine.select_engine(options)
    timer = Timer(options.progress)
    if float_graph is not None:
        with seeded(options.seed), engine.using_engine(choice.engine):
            batches = materialize(calibration_data, example_inputs, options.max_calibration_batches)
            return _static_result(copy.deepcopy(float_graph), example_inputs, batches, options, timer)
    with seeded(options.seed), engine.using_engine(choice.engine):
        work = eval_copy(model, example_inputs)
        with timer.step("trace"):
            try:
                gm, leaves = trace_model(work)
            except TraceError as error:
                if options.mode is Mode.DYNAMIC:
                    quantized, summary = _quantize_dynamic_untraced(work, example_inputs, calibration_data,
                                                                    options, choice, error, timer)
                else:
                    quantized, summary = regions.quantize_regions(work, example_inputs, calibration_data,
                                                                  options, error, timer.seconds, _quantize_part)
                return PipelineResult(_finish(quantized, summary, example_inputs))
            traced = open_up(work, gm, leaves, example_inputs)
        if options.mode is Mode.DYNAMIC:
            return PipelineResult(_finish(*_quantize_dynamic(traced, example_inputs, calibration_data, options,
                                                             choice, timer), example_inputs))
        batches = materialize(calibration_data, example_inputs, options.max_calibration_batches)
        check_example_outputs(work, example_inputs, traced.expected_outputs, batches)
        float_graph = build_float_graph(traced, example_inputs, batches, options, choice, timer)
        kept = copy.deepcopy(float_graph) if keep_float_graph else None
        return _static_result(float_graph, example_inputs, batches, options, timer, kept)


def _static_result(float_graph: FloatGraph, example_inputs: Batch, batches: list[Batch], options: QuantOptions,
                   timer: Timer, kept: FloatGraph | None = None) -> PipelineResult:
    quantized, summary = _quantize_static(float_graph, example_inputs, batches, options, timer)
    summary.notes += [few] if (few := few_samples_note(batches)) else []
    return PipelineResult(_finish(quantized, summary, example_inputs), kept)


def _quantize_part(module: nn.Module, example_inputs: Batch, batches: list[Batch],
                   options: QuantOptions) -> nn.Module:
    return quantize_model(module, example_inputs, batches, options).model


def _dynamic_smoothing(model: nn.Module, linears: dict[str, nn.Linear], batches: list[Batch], options: QuantOptions,
                       choice: engine.EngineChoice, timer: Timer, unsmoothed: dict[str, nn.Module] | None = None,
                       known_inputs: dict[str, list[torch.Tensor]] | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The smoothing factors of the float `model`'s `linears` that run as dynamic int8 (recovery.smoothing),
    measured on `batches`, and the summary's line for each smoothed layer, by layer."""
    if not options.smooth_activations or not linears:
        return {}, {}
    with timer.step("smoothing"):
        factors, choices = choose_smoothing(
            model, linears, batches, lambda linear, smoothing: engine.dynamic_linear(linear, options, choice, smoothing),
            unsmoothed, known_inputs)
    return factors, {c.layer: f"activation smoothing: {c.layer} (alpha {c.alpha}, int8 output error "
                              f"x{c.error_ratio:.2f}, smoothed float layer vs float {c.function_sqnr_db:.0f} dB)"
                     for c in choices if c.alpha is not None}


def _dynamic_linears(model: nn.Module, options: QuantOptions) -> dict[str, nn.Linear]:
    """The Linears of `model` that dynamic mode quantizes (all but those kept float)."""
    return {name: module for name, module in model.named_modules()
            if type(module) is nn.Linear and not key_covers(options.keep_float, name, module)}


def _dynamic_batches(example_inputs: Batch, calibration_data: Iterable[Any] | None,
                     options: QuantOptions) -> list[Batch]:
    """Dynamic mode needs no data: smoothing is measured on the calibration batches if given, else on
    the example inputs."""
    return ([example_inputs] if calibration_data is None
            else materialize(calibration_data, example_inputs, options.max_calibration_batches))


def _smooth_isolated_linears(quantized: nn.Module, float_gm: fx.GraphModule, names: list[str], batches: list[Batch],
                             options: QuantOptions, choice: engine.EngineChoice, timer: Timer,
                             known_inputs: dict[str, list[torch.Tensor]]) -> list[str]:
    """Static mode's Linears that became dynamic (backend.float_outputs) get smoothing where it measurably
    beats their rounded weights; returns the summary's lines. `known_inputs` are the float inputs the
    simulation pass kept (recover_on_simulation's linear_inputs)."""
    float_modules = dict(float_gm.named_modules())
    linears = {name: float_modules[name] for name in names if type(float_modules.get(name)) is nn.Linear}
    factors, lines = _dynamic_smoothing(float_gm, linears, batches, options, choice, timer,
                                        {name: quantized.get_submodule(name) for name in linears}, known_inputs)
    with engine.using_engine(choice.engine):
        for name, smoothing in factors.items():
            replace_module(quantized, name, engine.dynamic_linear(linears[name], options, choice, smoothing))
    return list(lines.values())


def _quantize_dynamic(traced: TracedModel, example_inputs: Batch, calibration_data: Iterable[Any] | None,
                      options: QuantOptions, choice: engine.EngineChoice, timer: Timer
                      ) -> tuple[nn.Module, QuantizationSummary]:
    leaves = traced.leaves
    smoothing, smoothed = _dynamic_smoothing(traced.graph, _dynamic_linears(traced.graph, options),
                                             _dynamic_batches(example_inputs, calibration_data, options),
                                             options, choice, timer)
    float_gm = copy.deepcopy(traced.graph)
    float_linears = {name: module for name, module in float_gm.named_modules() if type(module) is nn.Linear}
    with timer.step("convert"):
        prepared = engine.prepare_dynamic(traced.graph, example_inputs, options, choice, [l.module for l in leaves])
        quantized = engine.convert(prepared, choice)
        engine.refine_dynamic_linears(quantized, float_linears, options, choice, smoothing)
        restore_output_type(quantized, run_example(traced.work, example_inputs))
    slower = _keep_slower_layers_float(quantized, float_gm, dynamic_layers(quantized, float_gm), example_inputs,
                                       options, choice, timer)
    return quantized, engine_summary(options, choice, patterns=[str(p) for p in traced.patterns],
                                     rewrites=traced.rewrites + _smoothing_kept(smoothed, slower),
                                     float_layers=[(l.module, f"untraceable: {l.reason}") for l in leaves] + slower,
                                     timings_s=timer.seconds)


def _dynamic_recurrent_layers(quantized: fx.GraphModule, float_gm: fx.GraphModule, example_inputs: Batch,
                              skip: tuple[Any, ...], options: QuantOptions, choice: engine.EngineChoice,
                              timer: Timer) -> tuple[list[str], list[tuple[str, str]]]:
    """Static mode: torch.ao has no static int8 LSTM/GRU, so those layers run dynamic int8 (as torch's eager
    flow does) where that times faster than float (`_keep_slower_layers_float`); `skip` covers layers kept
    float (a float island around a recurrent layer is about its static neighbours: its input is float
    anyway). Returns the summary's rewrite lines and the (layer, why) of the layers that stayed float."""
    names = [name for name, module in quantized.named_modules()
             if type(module) in RECURRENT_TYPES and not key_covers(skip, name, module)]
    if not names:
        return [], []
    with timer.step("dynamic_recurrent"):
        engine.quantize_dynamic_recurrent(quantized, names, choice)
    slower = _keep_slower_layers_float(quantized, float_gm, names, example_inputs, options, choice, timer)
    kept_float = {name for name, _ in slower}
    return [f"dynamic int8 recurrent layer (no static int8 kernel): {name}" for name in names
            if name not in kept_float], slower


def _smoothing_kept(lines: dict[str, str], kept_float: list[tuple[str, str]]) -> list[str]:
    """The smoothing lines of the summary (by layer) without the layers that went back to float."""
    went_back = {name for name, _ in kept_float}
    return [line for layer, line in lines.items() if layer not in went_back]


def _keep_slower_layers_float(quantized: nn.Module, float_model: nn.Module, names: list[str], example_inputs: Batch,
                              options: QuantOptions, choice: engine.EngineChoice, timer: Timer
                              ) -> list[tuple[str, str]]:
    """The dynamic int8 layers `names` of `quantized` that time slower than float go back to float (in
    place; backend.dynamic_payoff), when options.dynamic_where_faster. Returns (layer, why) for those."""
    if not options.dynamic_where_faster:
        return []
    with timer.step("dynamic_payoff"):
        return keep_float_where_slower(quantized, float_model, names, example_inputs, choice.engine)


def _quantize_dynamic_untraced(work: nn.Module, example_inputs: Batch, calibration_data: Iterable[Any] | None,
                               options: QuantOptions, choice: engine.EngineChoice, error: TraceError, timer: Timer
                               ) -> tuple[nn.Module, QuantizationSummary]:
    """Dynamic mode needs no graph: a model whose forward does not trace gets its Linear and recurrent
    layers swapped for dynamic int8 modules in place, as torch.ao's eager `quantize_dynamic` does."""
    smoothing, smoothed = _dynamic_smoothing(work, _dynamic_linears(work, options),
                                             _dynamic_batches(example_inputs, calibration_data, options),
                                             options, choice, timer)
    float_model = copy.deepcopy(work) if options.dynamic_where_faster else work
    with timer.step("convert"):
        swapped = engine.quantize_dynamic_modules(work, options, choice, smoothing)
    slower = _keep_slower_layers_float(work, float_model, dynamic_layers(work, float_model), example_inputs,
                                       options, choice, timer)
    reason = str(error.__cause__ or error).splitlines()[0][:200]
    return work, engine_summary(
        options, choice, rewrites=[f"dynamic int8 module swap (no graph): {len(swapped) - len(slower)} layer(s)"]
        + _smoothing_kept(smoothed, slower),
        float_layers=[(name, "keep_float") for name in covered_modules(work, options.keep_float)
                      if name in weighted_layers(work).float] + slower,
        timings_s=timer.seconds,
        notes=[f"{type(work).__name__}.forward does not trace ({reason}); its Linear/LSTM/GRU layers were swapped "
               "for dynamic int8 modules in place, so the model's own Python code runs as written"])


def _quantize_static(float_graph: FloatGraph, example_inputs: Batch, batches: list[Batch],
                     options: QuantOptions, timer: Timer) -> tuple[nn.Module, QuantizationSummary]:
    traced, choice = float_graph.traced, float_graph.choice
    gm, leaves, keep_float = traced.graph, traced.leaves, list(options.keep_float)
    non_traceable = [leaf.module for leaf in leaves]
    plan, island_modules = None, []
    if options.float_islands:
        with timer.step("islands"):
            plan = find_float_islands(gm, example_inputs, quantizes_op, choice.engine,
                                      non_traceable + covered_modules(gm, keep_float),
                                      float_graph.depthwise_times_us(example_inputs))
            ops_in_float = float_ops(gm, plan, leaves, keep_float)  # before outlining renames the island ops
            island_modules = keep_islands_float(gm, plan)
    else:
        ops_in_float = float_ops(gm, None, leaves, keep_float)
    # recovery passes skip these layers (an untraceable leaf runs its own forward, not the layer's)
    float_keys = tuple(keep_float) + tuple(island_modules) + tuple(non_traceable)
    # what the simulation is corrected towards, and the float layers smoothing is measured on
    float_gm = copy.deepcopy(gm)
    on_simulation = options.bias_correction or options.optimize_rounding
    with timer.step("prepare"):
        conv_adds = sorted(fusable_convs(gm, example_inputs)) if choice.fuses_conv_add else []
        mapping = engine.build_static_qconfig_mapping(gm, options, choice, keep_float=island_modules)
        prepared = engine.prepare_static(gm, mapping, example_inputs, choice, non_traceable + island_modules)
    with timer.step("calibrate"):
        run_batches(prepared, float_graph.pass_batches, progress=options.progress)
        range_choices = engine.range_choices(prepared)
    grid = engine.weight_grid(options, choice)
    if grid.seven_bit:
        with timer.step("weight_bits"):
            grid, choice = measured_weight_grid(prepared, grid, choice, batches[0], tuple(conv_adds))
    rounded, corrected, linear_inputs = {}, [], {}
    if on_simulation:
        with timer.step("simulation_pass"):
            simulation = engine.convert_reference(copy.deepcopy(prepared), choice, conv_adds)
            rounded, corrected = recover_on_simulation(
                simulation, float_gm, float_graph.pass_batches, {}, round_weights=options.optimize_rounding,
                refit_weights=options.optimize_rounding, correct_biases=options.bias_correction, grid=grid,
                skip=float_keys, linear_inputs=linear_inputs)
            copy_biases(simulation, prepared, [c.layer for c in corrected])
    with timer.step("convert"):
        quantized, choice, fidelity = convert_on_most_faithful_engine(prepared, options, choice, batches[0],
                                                                      conv_adds)
        engine.install_weights(quantized, {name: (r.values, r.scale) for name, r in rounded.items()}, choice)
        dynamic_outputs = dynamic_output_linears(quantized, choice.engine, choice.dynamic_reduce_range)
        restore_output_type(quantized, run_example(traced.work, example_inputs))
    smoothed = _smooth_isolated_linears(quantized, float_gm, dynamic_outputs, float_graph.pass_batches, options,
                                        choice, timer, linear_inputs)
    recurrent, slower_recurrent = _dynamic_recurrent_layers(quantized, float_gm, example_inputs,
                                                            tuple(keep_float) + tuple(non_traceable), options,
                                                            choice, timer)
    with timer.step("inside_leaves"):
        around, parts = regions.quantize_inside_leaves(traced.work, quantized, leaves, [example_inputs] + batches,
                                                       options.replace(backend=choice.engine), _quantize_part)
    quantized = engine.repack_weights(quantized, choice)
    summary = engine_summary(
        options, choice, engine_fidelity_db=fidelity,
        patterns=[str(p) for p in traced.patterns]
        + [f"conv-add (one int8 kernel): {name} + add" for name in fused_layers(quantized)],
        rewrites=traced.rewrites + float_graph.rewrites + dynamic_output_rewrites(dynamic_outputs) + smoothed
        + recurrent,
        float_layers=float_layers_after(quantized, around, keep_float, plan) + slower_recurrent,
        float_ops=untraceable_ops(around, parts) + ops_in_float,
        conversions=count_conversions(quantized),
        estimated_latency_us={} if plan is None else {
            "float": plan.float_us, "every op int8": plan.all_int8_us, "fxq": plan.planned_us},
        eight_bit_weight_channels={name: sorted(rows) for name, rows in grid.eight_bit_channels.items()},
        equalized_pairs=float_graph.equalized_pairs, bias_corrected_layers=len(corrected),
        rounded_layers=len(rounded), observer_choices=range_choices, timings_s=timer.seconds)
    return quantized, with_parts(summary, parts)


def _finish(quantized: nn.Module, summary: QuantizationSummary, example_inputs: Batch) -> nn.Module:
    """Attach the summary, then speed up the float layers left in `quantized` (backend.float_layout).

    Every way the pipeline builds a model ends here once."""
    attach(quantized, summary)
    with engine.using_engine(summary.engine):
        kept_nchw = run_float_convs_channels_last(
            quantized, lambda candidate: output_tensors(run_example(candidate, example_inputs)))
    if kept_nchw:
        summary.notes.append(kept_nchw)
    clamp_float_layer_outputs_in_place(quantized)
    return quantized


# --- quantization-aware training -----------------------------------------------------------------

@dataclass
class QatRun:
    """What `convert_qat` needs to know about a model `prepare_qat_model` returned."""

    options: QuantOptions
    choice: engine.EngineChoice
    leaves: list[FloatLeaf]
    # a model whose forward does not trace: each region prepared on its own, by name
    regions: dict[str, "QatRun"] = field(default_factory=dict)


def prepare_qat_model(model: nn.Module, example_inputs: Batch, options: QuantOptions) -> tuple[nn.Module, QatRun]:
    """A trainable fake-quantized copy of `model`, traced in train mode (training-only branches such as
    dropout and auxiliary heads stay in the graph), BatchNorm folded during training. A model whose own
    forward does not trace gets each traceable region prepared in its place."""
    choice = engine.select_engine(options)
    with seeded(options.seed):
        work = copy.deepcopy(model).eval()
        run_example(work, example_inputs)
        try:
            gm, leaves = trace_model(work.train())
        except TraceError as error:
            def prepare_part(name: str, part: nn.Module, part_inputs: Batch) -> QatRun:
                prepared, run = prepare_qat_model(part, part_inputs, options.scoped_to(name))
                regions.keep_plain_attributes(part, prepared, name)
                replace_module(work, name, prepared)
                return run

            parts, around = regions.for_each_region(work.eval(), example_inputs, error, prepare_part)
            return work.train(), QatRun(options, choice, around, parts)
        traced = open_up(work, gm, leaves, example_inputs)
        prepared = engine.prepare_qat(traced.graph, example_inputs, choice, options.keep_float,
                                      [leaf.module for leaf in traced.leaves])
    return prepared, QatRun(options, choice, traced.leaves)


def convert_qat(trained: nn.Module, run: QatRun) -> nn.Module:
    """The int8 model of a trained QAT model (a copy in eval mode is converted), with its summary."""
    if run.regions:
        model = copy.deepcopy(trained).eval()
        for name, part_run in run.regions.items():
            part = convert_qat(model.get_submodule(name), part_run)
            regions.keep_plain_attributes(trained.get_submodule(name), part, name)
            replace_module(model, name, part.eval())  # convert_fx builds its int8 modules in training mode
        parts = {name: summary_of(model.get_submodule(name)) for name in run.regions}
        attach(model, regions_summary(run.options, model, run.leaves, parts, {},
                                      f"{type(model).__name__}.forward does not trace; trained and converted "
                                      f"separately: {', '.join(parts)}"))
        return model
    quantized = engine.convert(copy.deepcopy(trained).eval(), run.choice)
    dynamic_outputs = dynamic_output_linears(quantized, run.choice.engine, run.choice.dynamic_reduce_range)
    attach(quantized, engine_summary(run.options, run.choice,
                                     float_layers=float_layers_after(quantized, run.leaves, run.options.keep_float),
                                     rewrites=dynamic_output_rewrites(dynamic_outputs)))
    return quantized


# --- inspection ------------------------------------------------------------------------------------

def inspect_model(model: nn.Module, example_inputs: Batch) -> tuple[list[FoundPattern], list[FloatLeaf],
                                                                     list[fx.GraphModule]]:
    """The patterns fxq fuses, the untraceable modules and the traced graphs of a copy of `model`; for a
    model whose forward does not trace, of each region (patterns and leaves named from the model's root)."""
    work = eval_copy(model, example_inputs)
    try:
        gm, leaves = trace_model(work)
    except TraceError as error:
        traced_parts, around = regions.for_each_region(
            work, example_inputs, error, lambda name, part, part_inputs: trace_float_graph(part, part_inputs))
        patterns = [FoundPattern(found.pattern, tuple(f"{name}.{node}" for node in found.nodes))
                    for name, traced in traced_parts.items() for found in traced.patterns]
        leaves = around + [FloatLeaf(f"{name}.{leaf.module}", leaf.reason)
                           for name, traced in traced_parts.items() for leaf in traced.leaves]
        return patterns, leaves, [traced.graph for traced in traced_parts.values()]
    traced = open_up(work, gm, leaves, example_inputs)
    return traced.patterns, traced.leaves, [traced.graph]
