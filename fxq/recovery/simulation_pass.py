"""Recovery on the float simulation of the int8 model, one layer at a time with quantized inputs.

After calibration every activation's range is known, so the error each layer's inputs will carry in
int8 can be simulated. One walk over the simulation (layerwise.py) refits each well-determined layer's
weights to those inputs (rounding.refit_on_quantized_inputs), then corrects its bias
(bias_correction.correct_bias); both happen before the next layer runs, so it sees the corrected ones.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import fx

from fxq.backend.engine import WeightGrid
from fxq.calibration import Batch
from fxq.recovery.bias_correction import BiasCorrection, correct_bias
from fxq.recovery.layers import set_weights
from fxq.recovery.layerwise import paired_layers
from fxq.recovery.rounding import RoundedWeight, refit_on_quantized_inputs


@torch.no_grad()
def recover_on_simulation(simulation: fx.GraphModule, float_gm: fx.GraphModule, batches: Sequence[Batch],
                          rounded: dict[str, RoundedWeight], *, refit_weights: bool, correct_biases: bool,
                          grid: WeightGrid = WeightGrid(), skip: Iterable[str | type] = ()
                          ) -> tuple[dict[str, RoundedWeight], list[BiasCorrection]]:
    """Install `rounded` weights in `simulation`, then refit and bias-correct it in place, layer by layer.

    Returns the int8 weights to install (`rounded` with refitted layers replaced) and the corrections;
    the corrected biases are the simulation's.
    """
    set_weights(simulation, {name: r.values for name, r in rounded.items()})
    weights, corrections = dict(rounded), []
    for pair in paired_layers(simulation, float_gm, batches, skip):
        if refit_weights:
            refit = refit_on_quantized_inputs(pair, grid)
            if refit is not None:
                weights[pair.name] = refit
        if correct_biases:
            correction = correct_bias(pair)
            if correction is not None:
                corrections.append(correction)
    return weights, corrections
