"""fxq's public entry points: thin orchestration of front end -> recovery -> engine, nothing clever.

The user's model is never touched: every step works on a deep copy in eval mode (PTQ) or train mode (QAT).
"""

from __future__ import annotations

import copy
import dataclasses
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import fx, nn

from fxq.analysis.shadow import output_tensors
from fxq.backend import engine
from fxq.backend.conv_add import fusable_convs, fused_layers
from fxq.backend.float_outputs import dynamic_output_linears
from fxq.backend.float_layout import clamp_float_layer_outputs_in_place, run_float_convs_channels_last
from fxq.backend.weight_bits import measure_weight_bits, with_weight_grid
from fxq.calibration import Batch, first_nonfinite_module, materialize, outputs, run_batches
from fxq.config import Mode, QuantOptions
from fxq.errors import CalibrationError, ConfigError, FxqError, InputError, TraceError
from fxq.frontend.decompose import decompose_attention, may_decompose
from fxq.frontend.graph import replace_module, restore_output_type
from fxq.frontend.identities import remove_eval_identities
from fxq.frontend.inplace import InplaceRewrite, check_state_kept, remove_inplace_ops, state_versions
from fxq.frontend.islands import IslandPlan, find_float_islands, keep_islands_float
from fxq.frontend.patterns import FoundPattern, find_patterns
from fxq.frontend.rewrite import fold_batchnorm, fuse_clamping_activations
from fxq.frontend.trace import FloatLeaf, find_regions, trace_model
from fxq.kernel_choice import convert_on_most_faithful_engine, engine_for_graph
from fxq.recovery.equalization import equalize
from fxq.recovery.layers import copy_biases
from fxq.recovery.rounding import optimize_rounding
from fxq.recovery.simulation_pass import recover_on_simulation
from fxq.summary import QuantizationSummary, attach, summary_of
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


def _float_layers_after(quantized: nn.Module, around: list[FloatLeaf], keep_float: Iterable[Any],
                        plan: IslandPlan | None = None) -> list[tuple[str, str]]:
    """Every conv/linear call of the int8 model that runs in float, with the reason (`around`: the
    untraceable modules, innermost reason wins)."""
    island_reasons = {node: island.reason for island in (plan.islands if plan else ()) for node in island.nodes}
    modules = dict(quantized.named_modules())
    listed = []
    for name in engine.weighted_layers(quantized).float:
        enclosing = [leaf for leaf in around if _within(name, leaf.module)]
        module = modules.get(name)
        if enclosing:
            why = f"untraceable: {max(enclosing, key=lambda leaf: len(leaf.module)).reason}"
        elif any(_within(name, k) if isinstance(k, str) else isinstance(module, k) for k in keep_float):
            why = "keep_float"
        else:  # a module of its own, an op inside an outlined island, or the conv of a fused container
            why = island_reasons.get(name) or island_reasons.get(name.rpartition(".")[2]) \
                or island_reasons.get(name.rpartition(".")[0]) or "no int8 pattern"
        listed.append((name, why))
    return listed


def _open_up(work: nn.Module, gm: fx.GraphModule, leaves: list[FloatLeaf],
             example_inputs: Batch) -> tuple[fx.GraphModule, list[FloatLeaf], list[str]]:
    """After tracing: open up attention blocks that hide their linear layers (re-tracing), make in-place
    ops out of place (torch.ao's convert would drop those whose result is unused) and drop eval-mode
    no-ops. Returns the graph, the float leaves and the rewrites done, described."""
    if work.training:  # QAT: a forward would update BatchNorm statistics; attention stays as it is
        return gm, leaves, _describe_inplace(remove_inplace_ops(gm))
    decomposed = []
    if may_decompose(work):
        with torch.no_grad():
            expected = output_tensors(work(*example_inputs))

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
    rewrites += _describe_inplace(remove_inplace_ops(gm))
    removed = remove_eval_identities(gm)
    if removed:
        rewrites.append(f"drop_eval_identity: {len(removed)} ops that return their input in eval mode "
                        f"({', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''})")
    return gm, leaves, rewrites


def trace_and_open_up(work: nn.Module, example_inputs: Batch) -> tuple[fx.GraphModule, list[FloatLeaf], list[str]]:
    """The traced graph `quantize` works on (`_open_up` after tracing); fxq.sensitivity's float reference
    starts from it too, or its equalization groups would differ (an eval-mode StochasticDepth left in
    EfficientNet's graph cut its residual streams there)."""
    gm, leaves = trace_model(work)
    return _open_up(work, gm, leaves, example_inputs)


def _float_module_names(gm: fx.GraphModule, keep_float: Iterable[Any], leaves: list[FloatLeaf]) -> list[str]:
    """Names of the modules of `gm` that stay float whatever the cost model says."""
    names = [leaf.module for leaf in leaves]
    for name, module in gm.named_modules():
        if name and any(name == k or name.startswith(f"{k}.") if isinstance(k, str) else isinstance(module, k)
                        for k in keep_float):
            names.append(name)
    return names


def _float_ops(gm: fx.GraphModule, plan: IslandPlan | None, leaves: list[FloatLeaf],
               keep_float: Iterable[Any] = ()) -> list[tuple[str, str]]:
    """Ops of the traced float graph that run in float in the int8 model, grouped by kind, with why
    (untraceable leaves, and conv/linear layers kept float, are listed with the float layers)."""
    leaf_names = {leaf.module for leaf in leaves}
    kept_names = set(_float_module_names(gm, keep_float, []))
    no_kernel: dict[str, list[str]] = {}
    kept: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target) in leaf_names:
            continue
        if node.op == "call_module" and str(node.target) in kept_names and engine.quantizes_op(gm, node) \
                and not engine.is_weighted_module(gm.get_submodule(str(node.target))):
            kept.setdefault(type(gm.get_submodule(str(node.target))).__name__, []).append(str(node.target))
            continue
        if node.op in ("call_function", "call_method", "call_module") and not engine.quantizes_op(gm, node) \
                and not engine.is_shape_op(gm, node):
            kind = type(gm.get_submodule(str(node.target))).__name__ if node.op == "call_module" \
                else f".{node.target}()" if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
            no_kernel.setdefault(kind, []).append(str(node.target) if node.op == "call_module" else node.name)
    listed = []
    for kind, nodes in no_kernel.items():
        listed.append((f"{kind}: {_shown(nodes)}", "no int8 kernel in torch.ao: runs in float between dequantize and quantize"))
    for kind, names in kept.items():
        listed.append((f"{kind}: {_shown(names)}", "keep_float"))
    for island in plan.islands if plan else ():
        ops = ", ".join(dict.fromkeys(island.ops))
        listed.append((f"{ops}: {_shown(island.nodes)}", island.reason))
    return listed


def _shown(names: list[str]) -> str:
    """The first three names, and how many there are in all when there are more."""
    return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")


def _summary(options: QuantOptions, choice: engine.EngineChoice, **fields: Any) -> QuantizationSummary:
    return QuantizationSummary(options=options.describe(), engine=choice.engine, engine_reason=choice.reason,
                               reduce_range=choice.reduce_range, kernel_saturates=choice.kernel_saturates,
                               seven_bit_weights=choice.seven_bit_weights,
                               **fields)


def quantize(model: nn.Module, example_inputs: Any, *, calibration_data: Iterable[Any] | None = None,
             mode: str = "static", backend: str = "auto", **options: Any) -> nn.Module:
    """Return an int8 copy of `model`: same call signature, float tensors in and out, int8 kernels inside.

    mode="static" calibrates weights and activations on `calibration_data` (an iterable of batches);
    mode="dynamic" quantizes Linear/LSTM/GRU weights and needs no data; QAT goes through `prepare_qat`.
    Other keyword arguments are `QuantOptions` fields (observer, keep_float, target_sqnr_db, ...).

    int8 ops dispatch on the global engine (onednn's fused conv + add runs on no other), so
    `torch.backends.quantized.engine` is left set to the engine the returned model was built and checked
    for, whichever way it was built.
    """
    quantized = _quantize(model, example_inputs, calibration_data, mode, backend, options)
    torch.backends.quantized.engine = summary_of(quantized).engine
    return quantized


def _finish(quantized: nn.Module, summary: QuantizationSummary, example_inputs: Batch) -> nn.Module:
    """Attach the summary, then speed up the float layers left in `quantized` (backend.float_layout).

    Every way `_quantize` builds a model ends here once; the mixed-precision searches return a model an
    inner `quantize` call already finished.
    """
    attach(quantized, summary)
    with engine.using_engine(summary.engine):
        kept_nchw = run_float_convs_channels_last(
            quantized, lambda candidate: output_tensors(run_example(candidate, example_inputs)))
    if kept_nchw:
        summary.notes.append(kept_nchw)
    clamp_float_layer_outputs_in_place(quantized)
    return quantized


def _quantize(model: nn.Module, example_inputs: Any, calibration_data: Iterable[Any] | None, mode: str,
              backend: str, options: dict[str, Any]) -> nn.Module:
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
        versions = state_versions(work)
        run_example(work, example_inputs)
        check_state_kept(work, versions)
        with timer.step("trace"):
            try:
                gm, leaves = trace_model(work)
            except TraceError as error:
                if opts.mode is not Mode.STATIC or opts.target_sqnr_db is not None or opts.eval_fn is not None:
                    raise
                quantized, summary = _quantize_regions(work, example_inputs, calibration_data, opts, options,
                                                       error, timer)
                gm = None
            if gm is not None:
                gm, leaves, traced_rewrites = _open_up(work, gm, leaves, example_inputs)
                patterns = find_patterns(gm)
        if gm is None:
            return _finish(quantized, summary, example_inputs)
        non_traceable = [leaf.module for leaf in leaves]
        if opts.mode is Mode.DYNAMIC:
            with timer.step("convert"):
                prepared = engine.prepare_dynamic(gm, example_inputs, opts, choice, non_traceable)
                quantized = engine.convert(prepared, choice)
                restore_output_type(quantized, run_example(work, example_inputs))
            return _finish(quantized, _summary(opts, choice, patterns=[str(p) for p in patterns],
                                               rewrites=traced_rewrites,
                                               float_layers=[(l.module, f"untraceable: {l.reason}") for l in leaves],
                                               timings_s=timer.seconds), example_inputs)
        if opts.target_sqnr_db is not None or opts.eval_fn is not None:
            from fxq.recovery.mixed_precision import quantize_to_metric, quantize_to_target

            batches = materialize(calibration_data, example_inputs, opts.max_calibration_batches)
            base = {key: value for key, value in options.items() if key not in ("target_sqnr_db", "eval_fn",
                                                                                 "max_drop")}
            base.update(mode=mode, backend=backend)
            if opts.eval_fn is not None:
                return quantize_to_metric(model, example_inputs, batches, opts.eval_fn, opts.max_drop, base)
            return quantize_to_target(model, example_inputs, batches, opts.target_sqnr_db, base)
        quantized, summary = _quantize_static(work, gm, example_inputs, calibration_data, opts, options, choice,
                                              leaves, patterns, timer, traced_rewrites)
    return _finish(quantized, summary, example_inputs)


def _describe_inplace(rewrites: list[InplaceRewrite]) -> list[str]:
    """One line per in-place op whose later readers were rewired; the plain ones (ReLU(inplace=True) on a
    tensor nothing else reads) counted on one line."""
    lines = [f"out_of_place: {r.node} ({r.op}; {r.rewired_readers} later reader(s) now read its result)"
             for r in rewrites if r.rewired_readers]
    plain = [r.node for r in rewrites if not r.rewired_readers]
    if plain:
        lines.append(f"out_of_place: {len(plain)} in-place op(s) with no later reader "
                     f"({', '.join(plain[:3])}{', ...' if len(plain) > 3 else ''})")
    return lines


def _quantize_static(work: nn.Module, gm: fx.GraphModule, example_inputs: Batch,
                     calibration_data: Iterable[Any] | None, opts: QuantOptions, options: dict[str, Any],
                     choice: engine.EngineChoice,
                     leaves: list[FloatLeaf], patterns: list[FoundPattern], timer: _Timer,
                     traced_rewrites: list[str]) -> tuple[nn.Module, QuantizationSummary]:
    batches = materialize(calibration_data, example_inputs, opts.max_calibration_batches)
    _check_float_outputs(work, batches)
    non_traceable = [leaf.module for leaf in leaves]
    keep_float = list(opts.keep_float)
    with timer.step("rewrite"):
        rewrites = fold_batchnorm(gm) + fuse_clamping_activations(gm)
    choice = engine_for_graph(choice, opts, has_conv_adds=bool(fusable_convs(gm, example_inputs)))
    equalized, corrected = [], []
    if opts.equalize:
        with timer.step("equalize"):
            equalized = equalize(gm, batches)
    plan, island_modules = None, []
    if opts.float_islands:
        with timer.step("islands"):
            plan = find_float_islands(gm, example_inputs, engine.quantizes_op, choice.engine,
                                      _float_module_names(gm, keep_float, leaves))
            float_ops = _float_ops(gm, plan, leaves, keep_float)  # before outlining renames the island ops
            island_modules = keep_islands_float(gm, plan)
    else:
        float_ops = _float_ops(gm, None, leaves, keep_float)
    float_keys = tuple(keep_float) + tuple(island_modules)  # recovery passes skip these layers
    on_simulation = opts.bias_correction or opts.optimize_rounding
    float_gm = copy.deepcopy(gm) if on_simulation else None  # what the simulation is corrected towards
    with timer.step("prepare"):
        conv_adds = sorted(fusable_convs(gm, example_inputs)) if choice.fuses_conv_add else []
        mapping = engine.build_static_qconfig_mapping(gm, opts, choice, keep_float=island_modules)
        prepared = engine.prepare_static(gm, mapping, example_inputs, choice, non_traceable + island_modules)
    with timer.step("calibrate"):
        run_batches(prepared, batches, progress=opts.progress)
        range_choices = engine.range_choices(prepared)
    grid = engine.weight_grid(opts, choice)
    if grid.seven_bit:
        with timer.step("weight_bits"):
            grid, choice = _measured_weight_grid(prepared, grid, choice, batches[0], conv_adds)
    rounded = {}
    if opts.optimize_rounding:
        with timer.step("rounding"):  # on the float graph: prepare fused modules of `gm` in place
            rounded = optimize_rounding(float_gm, batches, grid, skip=float_keys)
    if on_simulation:
        with timer.step("simulation_pass"):
            simulation = engine.convert_reference(copy.deepcopy(prepared), choice, conv_adds)
            rounded, corrected = recover_on_simulation(
                simulation, float_gm, batches, rounded, refit_weights=opts.optimize_rounding,
                correct_biases=opts.bias_correction, grid=grid, skip=float_keys)
            copy_biases(simulation, prepared, [c.layer for c in corrected])
    with timer.step("convert"):
        quantized, choice, fidelity = convert_on_most_faithful_engine(prepared, opts, choice, batches[0],
                                                                      conv_adds)
        engine.install_weights(quantized, {name: (r.values, r.scale) for name, r in rounded.items()}, choice)
        dynamic_outputs = dynamic_output_linears(quantized, choice.engine)
        restore_output_type(quantized, run_example(work, example_inputs))
    with timer.step("inside_leaves"):
        around, parts = _quantize_inside_leaves(work, quantized, leaves, [example_inputs] + batches, options,
                                                choice.engine)
    quantized = engine.repack_weights(quantized, choice)
    summary = _summary(
        opts, choice, engine_fidelity_db=fidelity,
        patterns=[str(p) for p in patterns] + [f"{r}.{p}" for r, s in parts.items() for p in s.patterns]
        + [f"conv-add (one int8 kernel): {name} + add" for name in fused_layers(quantized)],
        rewrites=traced_rewrites + [f"{r.kind}: {' + '.join(r.modules)}" for r in rewrites]
        + _dynamic_output_rewrites(dynamic_outputs),
        float_layers=_float_layers_after(quantized, around, keep_float, plan)
        + [(f"{r}.{n}", why) for r, s in parts.items() for n, why in s.float_layers],
        float_ops=_untraceable_ops(around, parts) + float_ops
        + [(f"{r}: {what}", why) for r, s in parts.items() for what, why in s.float_ops],
        conversions=engine.count_conversions(quantized),
        estimated_latency_us={} if plan is None else {
            "float": plan.float_us, "every op int8": plan.all_int8_us, "fxq": plan.planned_us},
        eight_bit_weight_channels={name: sorted(rows) for name, rows in grid.eight_bit_channels.items()}
        | {f"{r}.{n}": rows for r, s in parts.items() for n, rows in s.eight_bit_weight_channels.items()},
        equalized_pairs=len(equalized), bias_corrected_layers=len(corrected), rounded_layers=len(rounded),
        observer_choices={**range_choices,
                          **{f"{r}.{n}": c for r, s in parts.items() for n, c in s.observer_choices.items()}},
        timings_s=timer.seconds)
    return quantized, summary


def _dynamic_output_rewrites(names: list[str]) -> list[str]:
    return [f"returned linear as dynamic int8 (float output, no output rounding): {name}" for name in names]


def _measured_weight_grid(prepared: fx.GraphModule, grid: engine.WeightGrid, choice: engine.EngineChoice,
                          batch: Batch, conv_adds: list[str]) -> tuple[engine.WeightGrid, engine.EngineChoice]:
    """On a saturating kernel, give 8-bit weights back to the output channels measured not to overflow
    (backend.weight_bits; with per-tensor weights, to the layers where every channel can), in `prepared`
    too; the engine choice's reason says how many."""
    measured = measure_weight_bits(prepared, choice, grid, batch, tuple(conv_adds))
    kept = {m.name: m.eight_bit_channels for m in measured}
    if not grid.per_channel:
        kept = {m.name: kept[m.name] for m in measured if len(kept[m.name]) == m.channels}
    grid = dataclasses.replace(grid, eight_bit_channels={name: rows for name, rows in kept.items() if rows})
    with_weight_grid(prepared, grid)
    channels = sum(m.channels for m in measured)
    whole = sum(1 for m in measured if len(kept.get(m.name, ())) == m.channels)
    reason = f"{choice.reason}; measured not to overflow, {sum(map(len, kept.values()))} of {channels} output " \
             f"channels keep 8-bit weights ({whole} of {len(measured)} layers entirely)"
    return grid, dataclasses.replace(choice, reason=reason)


# --- models whose own forward does not trace ------------------------------------------------------

def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _region_options(options: dict[str, Any], region: str) -> dict[str, Any]:
    """`quantize` keyword arguments for one region: module names made relative to it."""
    scoped = dict(options)
    prefix = region + "."
    for key in ("keep_float",):
        if key in scoped:
            entries = (scoped[key],) if isinstance(scoped[key], (str, type)) else tuple(scoped[key])
            scoped[key] = tuple(e[len(prefix):] if isinstance(e, str) else e for e in entries
                                if not isinstance(e, str) or e.startswith(prefix))
    if "observer_overrides" in scoped:
        scoped["observer_overrides"] = {k[len(prefix):] if isinstance(k, str) else k: v
                                        for k, v in scoped["observer_overrides"].items()
                                        if not isinstance(k, str) or k.startswith(prefix)}
    return scoped


def _capture_calls(work: nn.Module, regions: list[str], batches: list[Batch]) -> dict[str, list[list[tuple]]]:
    """Per region, per batch: the positional arguments of each call (None for a call with keywords)."""
    calls: dict[str, list[list[tuple]]] = {name: [] for name in regions}
    handles = []
    for name in regions:
        def record(_module, args, kwargs, name=name):
            calls[name][-1].append(None if kwargs else tuple(args))
        handles.append(work.get_submodule(name).register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad():
            for batch in batches:
                for name in regions:
                    calls[name].append([])
                work(*batch)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _quantize_parts(work: nn.Module, target: nn.Module, parts: list[str], around: list[FloatLeaf],
                    runs: list[Batch], options: dict[str, Any], backend: str) -> dict[str, QuantizationSummary]:
    """Quantize each named traceable part of the float model `work` on the arguments it receives when
    `work` runs `runs` (the first run is the example), and put the int8 part into `target` under the same
    name. Parts that cannot be quantized are added to `around` with the reason."""
    calls = _capture_calls(work, parts, runs)
    summaries = {}
    for name in parts:
        example_calls = calls[name][0]
        part_batches = [args for run in calls[name][1:] for args in run]
        if not example_calls or None in example_calls or None in part_batches:
            around.append(FloatLeaf(name, "not called, or called with keyword arguments, on the example inputs"))
            continue
        try:
            quantized = quantize(work.get_submodule(name), example_calls[0], calibration_data=part_batches,
                                 backend=backend, **_region_options(options, name))
        except FxqError as failure:
            around.append(FloatLeaf(name, f"not quantized: {failure}"[:300]))
            continue
        summaries[name] = summary_of(quantized)
        backend = summaries[name].engine  # every part on the engine the first one chose
        replace_module(target, name, quantized)
    return summaries


def _untraceable_layers(model: nn.Module, around: list[FloatLeaf]) -> list[tuple[str, str]]:
    """Float conv/linear calls that run inside untraceable code, each with the reason of the innermost
    untraceable module around it."""
    listed = []
    for name in engine.weighted_layers(model).float:
        enclosing = [leaf for leaf in around if not leaf.module or _within(name, leaf.module)]
        if enclosing:
            innermost = max(enclosing, key=lambda leaf: len(leaf.module))
            listed.append((name, f"untraceable: {innermost.reason}"))
    return listed


def _untraceable_ops(around: list[FloatLeaf], parts: Iterable[str]) -> list[tuple[str, str]]:
    """The untraceable modules themselves, as float code, with what was quantized inside them."""
    listed = []
    for leaf in around:
        inside = [p for p in parts if not leaf.module or _within(p, leaf.module)]
        what = f"{leaf.module or '(top-level forward)'}: runs as Python in float" + (
            f"; int8 inside: {', '.join(inside[:4])}{', ...' if len(inside) > 4 else ''}" if inside else "")
        listed.append((what, f"untraceable: {leaf.reason}"))
    return listed


def _quantize_regions(work: nn.Module, example_inputs: Batch, calibration_data: Iterable[Any] | None,
                      opts: QuantOptions, options: dict[str, Any], error: TraceError,
                      timer: _Timer) -> tuple[nn.Module, QuantizationSummary]:
    """Quantize each traceable submodule of a model whose own forward cannot be traced (detection models:
    the backbone, the box head), calibrated on the inputs it receives inside the float model; the model's
    own code and the untraceable modules around the regions run in float, and are reported."""
    reason = str(error.__cause__ or error).splitlines()[0][:200]
    regions, around = find_regions(work, reason)
    if not regions:
        raise error
    batches = materialize(calibration_data, example_inputs, opts.max_calibration_batches)
    _check_float_outputs(work, batches)
    summaries = _quantize_parts(work, work, regions, around, [example_inputs] + batches, options,
                                opts.backend.value)
    first = next(iter(summaries.values()), None)
    merged = QuantizationSummary(
        options=opts.describe(), engine=first.engine if first else opts.backend.value,
        engine_reason=first.engine_reason if first else "no region quantized",
        reduce_range=any(s.reduce_range for s in summaries.values()),
        kernel_saturates=any(s.kernel_saturates for s in summaries.values()),
        seven_bit_weights=any(s.seven_bit_weights for s in summaries.values()),
        eight_bit_weight_channels={f"{r}.{n}": rows for r, s in summaries.items()
                                   for n, rows in s.eight_bit_weight_channels.items()},
        float_layers=_untraceable_layers(work, around)
        + [(f"{r}.{n}", why) for r, s in summaries.items() for n, why in s.float_layers],
        patterns=[f"{r}.{p}" for r, s in summaries.items() for p in s.patterns],
        rewrites=[f"{r}: {w}" for r, s in summaries.items() for w in s.rewrites],
        float_ops=_untraceable_ops(around, summaries)
        + [(f"{r}: {what}", why) for r, s in summaries.items() for what, why in s.float_ops],
        conversions={k: sum(s.conversions.get(k, 0) for s in summaries.values()) for k in ("quantize", "dequantize")},
        observer_choices={f"{r}.{n}": c for r, s in summaries.items() for n, c in s.observer_choices.items()},
        timings_s=dict(timer.seconds),
        notes=[f"{type(work).__name__}.forward does not trace ({reason}); quantized separately: "
               f"{', '.join(summaries) or 'nothing'}"])
    return work, merged


def _quantize_inside_leaves(work: nn.Module, quantized: nn.Module, leaves: list[FloatLeaf], runs: list[Batch],
                            options: dict[str, Any], backend: str) -> tuple[list[FloatLeaf], dict[str, QuantizationSummary]]:
    """The traceable parts inside untraceable leaves (Gate.conv of a Gate whose forward branches on data),
    quantized on their own and put into the int8 model's leaves. Returns every untraceable module (leaves
    and the untraceable modules inside them) and the parts' summaries."""
    around: list[FloatLeaf] = []
    parts: list[str] = []
    for leaf in leaves:
        regions, inner = find_regions(work.get_submodule(leaf.module), leaf.reason)
        parts += [f"{leaf.module}.{region}" for region in regions]
        around += [FloatLeaf(f"{leaf.module}.{i.module}" if i.module else leaf.module, i.reason) for i in inner]
    summaries = _quantize_parts(work, quantized, parts, around, runs, options, backend) if parts else {}
    return around, summaries


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
        work.train()  # traced in train mode: training-only branches (dropout, auxiliary heads) stay in the graph
        gm, leaves, _ = trace_and_open_up(work, example_inputs)
        prepared = engine.prepare_qat(gm, example_inputs, choice, opts.keep_float, [l.module for l in leaves])
    _QAT_STATE[prepared] = (opts, choice, leaves)
    return prepared


def freeze_observers(qat_model: nn.Module) -> nn.Module:
    """Stop updating quantization ranges in a model from `prepare_qat` (in place; returns it)."""
    return engine.freeze_observers(qat_model)


def freeze_bn_stats(qat_model: nn.Module) -> nn.Module:
    """Stop updating BatchNorm running statistics in a model from `prepare_qat` (in place; returns it)."""
    return engine.freeze_bn_stats(qat_model)


def convert(prepared: nn.Module) -> nn.Module:
    """The int8 model of a trained `prepare_qat` model (the prepared model itself is left as it is).

    A model wrapped for training in DistributedDataParallel or DataParallel is unwrapped first.
    """
    if isinstance(prepared, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        prepared = prepared.module
    if prepared not in _QAT_STATE:
        raise InputError("fxq.convert takes the model returned by fxq.prepare_qat (after training); "
                         "for post-training quantization call fxq.quantize")
    opts, choice, leaves = _QAT_STATE[prepared]
    trained = copy.deepcopy(prepared).eval()
    quantized = engine.convert(trained, choice)
    dynamic_outputs = dynamic_output_linears(quantized, choice.engine)
    attach(quantized, _summary(opts, choice, float_layers=_float_layers_after(quantized, leaves, opts.keep_float),
                               rewrites=_dynamic_output_rewrites(dynamic_outputs)))
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
    gm, leaves, _ = trace_and_open_up(work, example_inputs)
    counts: dict[str, int] = {}
    for _, module in gm.named_modules():
        if isinstance(module, engine.WEIGHT_TYPES):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return Inspection(find_patterns(gm), leaves, counts)
