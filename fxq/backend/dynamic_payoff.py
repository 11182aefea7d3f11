"""Dynamic int8 only where it runs faster than float, timed on this CPU at the example inputs' shapes.

A dynamic int8 layer finds its input's range, quantizes the input and dequantizes its output on every call.
For a layer with little arithmetic per call (a narrow LSTM whose time goes to its per-step loop, a Linear
over a few rows) that overhead is larger than what the int8 kernel saves: a text-line recognizer's two
bidirectional LSTMs made the whole dynamic model slower than float. Each candidate layer is timed inside
whole passes of the float and the int8 model (report.latency.module_times_us: real inputs, real caches),
in alternating rounds, by its fastest pass (a busy machine stretches medians at random, not minima); a
layer whose int8 time is above its float time by more than MARGIN goes back to float. Being timed, the
choice can differ between runs near the break-even point; either choice is correct there.

A model whose only int8 layers are dynamic ones (dynamic mode; a transformer whose static Linears all became
dynamic, backend.float_outputs) runs on the engine that times fastest on it. The engines compute the same
int8 GEMM on such layers, but not equally fast: on the reference Xeon a dynamic 384 -> 1536 Linear on 1024
tokens took 593 us on onednn and 1305 us on x86 (fbgemm), where static int8 layers had run faster on x86.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import fx, nn

from fxq.analysis.metrics import sqnr_db
from fxq.backend.engine import using_engine
from fxq.backend.kernel_choice import TOLERANCE_DB, same_grid_engines
from fxq.backend.op_kinds import (DYNAMIC_TYPES, count_conversions, is_dynamic_quantized_module,
                                  is_weighted_quantized_module)
from fxq.calibration import output_tensors
from fxq.frontend.graph import replace_module
from fxq.report.latency import fastest_call_us, layer_inputs, module_times_us

__all__ = ["ROUNDS", "MARGIN", "dynamic_layers", "keep_float_where_slower", "fastest_engine_for_dynamic"]

ROUNDS = 3  # each model timed this many times, alternating; each layer's fastest pass counts
MARGIN = 1.05  # int8 stays unless it is this much slower than float: near break-even, int8 saves memory


def dynamic_layers(quantized: nn.Module, float_model: nn.Module) -> list[str]:
    """Names of the dynamic int8 layers of `quantized` whose float layer of the same name is in `float_model`."""
    float_layers = {name for name, module in float_model.named_modules() if isinstance(module, DYNAMIC_TYPES)}
    return [name for name, module in quantized.named_modules()
            if name in float_layers and is_dynamic_quantized_module(module)]


def keep_float_where_slower(quantized: nn.Module, float_model: nn.Module, names: Iterable[str],
                            example_inputs: tuple[Any, ...], engine: str) -> list[tuple[str, str]]:
    """Put the float layer of `float_model` back in `quantized` (in place) for each of `names` (dynamic int8
    layers, same names in both models) that is not faster in int8. Returns (layer, why) for those layers."""
    names = list(names)
    if not names:
        return []
    float_us: dict[str, float] = {}
    int8_us: dict[str, float] = {}
    with using_engine(engine):
        for _ in range(ROUNDS):
            for model, times in ((float_model, float_us), (quantized, int8_us)):
                for name, us in module_times_us(model, example_inputs, names, warmup=1, repeats=5,
                                                fastest=True).items():
                    times[name] = min(us, times.get(name, us))
    kept_float = []
    for name in names:
        if int8_us[name] > MARGIN * float_us[name]:
            replace_module(quantized, name, copy.deepcopy(float_model.get_submodule(name)))
            kept_float.append((name, f"dynamic int8 not faster than float here ({int8_us[name]:.0f} us vs "
                                     f"{float_us[name]:.0f} us per call at the example inputs' shapes)"))
    return kept_float


def only_dynamic_int8(model: nn.Module) -> bool:
    """Whether `model` has dynamic int8 layers and no static int8 op (layer, or quantize call in a graph)."""
    int8 = [module for module in model.modules() if is_weighted_quantized_module(module)]
    return (bool(int8) and all(map(is_dynamic_quantized_module, int8))
            and not any(count_conversions(m)["quantize"] for m in model.modules() if isinstance(m, fx.GraphModule)))


def fastest_engine_for_dynamic(quantized: nn.Module, example_inputs: tuple[Any, ...], current: str,
                               float_outputs: list[torch.Tensor]) -> tuple[str, str]:
    """For a model whose only int8 layers are dynamic (`only_dynamic_int8`), the engine (of those taking the
    same grids as `current`, kernel_choice.same_grid_engines) on which those layers run fastest, with the
    model's dynamic layers repacked for it in place. Each layer is timed on its own, on the arguments it
    gets in a pass of the example inputs: at batch 1 the model's Python code between the layers (a
    transformer's), or forward hooks timing them inside a pass, take as long as the layers and hide the
    difference, which the model's traced form (backend.traced_serving) does not. Another engine than
    `current` must be MARGIN faster and as faithful to `float_outputs` (the float model's on the example
    inputs) within kernel_choice.TOLERANCE_DB: the engines round the input onto the same grid with their
    own arithmetic, so outputs differ a little (on MiniLM's padded positions, a lot), error against float
    does not. Returns the engine and a line for the summary."""
    names = [name for name, module in quantized.named_modules() if is_dynamic_quantized_module(module)]
    copies, fidelity_db = {}, {}
    for name in same_grid_engines(current):
        with using_engine(name):
            copies[name] = copy.deepcopy(quantized)  # packed afresh for this engine
            with torch.inference_mode():
                outputs = output_tensors(copies[name](*example_inputs))
        fidelity_db[name] = min(float(sqnr_db(f, o)) for f, o in zip(float_outputs, outputs))
    inputs = layer_inputs(quantized, example_inputs, names)
    fastest_us: dict[str, dict[str, float]] = {name: {} for name in copies}  # engine -> layer -> us
    for _ in range(ROUNDS):
        for name, model in copies.items():
            with using_engine(name):
                for layer, args in inputs.items():
                    us = fastest_call_us(model.get_submodule(layer), args)
                    fastest_us[name][layer] = min(us, fastest_us[name].get(layer, us))
    best_s = {name: sum(times.values()) * 1e-6 for name, times in fastest_us.items()}
    faithful = [name for name in copies if fidelity_db[name] >= fidelity_db[current] - TOLERANCE_DB]
    chosen = min(faithful, key=best_s.__getitem__)
    if best_s[chosen] * MARGIN > best_s[current]:
        chosen = current
    if chosen != current:
        for name in names:
            replace_module(quantized, name, copies[chosen].get_submodule(name))
    measured = ", ".join(f"{name} {best_s[name] * 1e3:.1f} ms ({fidelity_db[name]:.1f} dB)" for name in copies)
    return chosen, (f"engine {chosen}: the only int8 layers are dynamic; at the example inputs' shapes they took "
                    f"(output SQNR against float) {measured}")
