"""Dynamic int8 only where it runs faster than float, timed on this CPU at the example inputs' shapes.

A dynamic int8 layer finds its input's range, quantizes the input and dequantizes its output on every call.
For a layer with little arithmetic per call (a narrow LSTM whose time goes to its per-step loop, a Linear
over a few rows) that overhead is larger than what the int8 kernel saves: a text-line recognizer's two
bidirectional LSTMs made the whole dynamic model slower than float. Each candidate layer is timed inside
whole passes of the float and the int8 model (report.latency.module_times_us: real inputs, real caches),
in alternating rounds, by its fastest pass (a busy machine stretches medians at random, not minima); a
layer whose int8 time is above its float time by more than MARGIN goes back to float. Being timed, the
choice can differ between runs near the break-even point; either choice is correct there.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

from torch import nn

from fxq.backend.engine import using_engine
from fxq.backend.op_kinds import DYNAMIC_TYPES, is_dynamic_quantized_module
from fxq.frontend.graph import replace_module
from fxq.report.latency import module_times_us

__all__ = ["ROUNDS", "MARGIN", "dynamic_layers", "keep_float_where_slower"]

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
