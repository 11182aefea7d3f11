"""Recovery on the float simulation of the int8 model, one layer at a time with quantized inputs.

After calibration every activation's range is known, so the error each layer's inputs will carry in
int8 can be simulated. One walk over the simulation (layerwise.py) refits each well-determined layer's
weights to its quantized inputs and rounds them (rounding.refit_on_quantized_inputs), rounds the other
layers' weights on their float inputs (rounding.round_on_float_inputs: the walk holds those inputs, so
the rounding needs no pass of its own), then corrects the layer's bias (bias_correction.correct_bias);
all happen before the next layer runs, so it sees the corrected ones.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import fx, nn

from fxq.backend.engine import WeightGrid
from fxq.calibration import Batch
from fxq.recovery.bias_correction import BiasCorrection, correct_bias
from fxq.recovery.layers import set_weights
from fxq.recovery.layerwise import paired_layers, walked_layers
from fxq.recovery.rounding import (RoundedWeight, optimize_rounding, refit_on_quantized_inputs,
                                   round_on_float_inputs)
from fxq.recovery.smoothing import KEPT_INPUT_VALUES


@torch.no_grad()
def recover_on_simulation(simulation: fx.GraphModule, float_gm: fx.GraphModule, batches: Sequence[Batch],
                          rounded: dict[str, RoundedWeight], *, refit_weights: bool, correct_biases: bool,
                          round_weights: bool = False, grid: WeightGrid = WeightGrid(),
                          skip: Iterable[str | type] = (), linear_inputs: dict[str, list[torch.Tensor]] | None = None
                          ) -> tuple[dict[str, RoundedWeight], list[BiasCorrection]]:
    """Install `rounded` weights in `simulation`, then refit and bias-correct it in place, layer by layer.

    With `round_weights`, every supported layer the refit leaves alone is rounded as
    rounding.optimize_rounding would (the walked layers on the walk's inputs, the others, such as layers
    called twice, in a pass of their own before the walk), replacing `rounded`'s entry. Returns the int8
    weights to install (`rounded` with rounded and refitted layers replaced) and the corrections; the
    corrected biases are the simulation's.

    A `linear_inputs` dict receives the float inputs of the walked nn.Linear layers (per batch of the walk),
    while they hold at most smoothing.KEPT_INPUT_VALUES values in all, so that activation smoothing can
    choose on them without a pass of its own.
    """
    weights, corrections = dict(rounded), []
    if round_weights:
        unwalked = {name for name, _ in float_gm.named_modules()} - walked_layers(simulation, float_gm, skip)
        weights |= optimize_rounding(float_gm, batches, grid, skip, only=unwalked)
    set_weights(simulation, {name: r.values for name, r in weights.items()})
    kept_values = 0
    for pair in paired_layers(simulation, float_gm, batches, skip):
        if linear_inputs is not None and type(pair.float_layer) is nn.Linear:
            kept_values += sum(x.numel() for x in pair.float_inputs)
            if kept_values <= KEPT_INPUT_VALUES:
                linear_inputs[pair.name] = pair.float_inputs
        # the refit (installed in the simulation) rounds on its own; the rounding on float inputs is for the
        # layers it leaves alone, and is computed only for them
        refit = refit_on_quantized_inputs(pair, grid) if refit_weights else None
        if refit is not None:
            weights[pair.name] = refit
        elif round_weights and (rounding := round_on_float_inputs(pair, grid)) is not None:
            pair.simulated.weight.copy_(rounding.values)
            weights[pair.name] = rounding
        if correct_biases:
            correction = correct_bias(pair)
            if correction is not None:
                corrections.append(correction)
    return weights, corrections
