"""Activation smoothing for dynamic int8 Linears (the migration of Xiao et al.'s SmoothQuant), with the
strength chosen per layer by measured output error.

A dynamic int8 Linear quantizes each call's input on one per-tensor range. A transformer's residual
stream has a few channels tens of times larger than the rest (BERT's outlier dimensions), so that range
is set by them and the other channels get a handful of levels. Dividing input channel j by
s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) and multiplying weight column j by s_j leaves the float
function unchanged and moves part of the range from the activations into the per-channel weights.

SmoothQuant uses one alpha for a whole model. Here each layer takes the alpha (or none) whose actual
int8 kernel output is closest to its float output on the calibration batches: the migration costs one
multiply per call, and layers whose input has no outliers gain nothing from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fxq.analysis.metrics import sqnr_db
from fxq.calibration import run_batches

# Up to 0.9: with 0.95 and 1.0 as well, 13 of MiniLM's 37 layers took them (each layer's own output error
# was lower) and its embedding SQNR fell from 22.9 to 20.6 dB; migrating all of a channel's range into the
# weights costs more downstream than the layer's own error shows.
ALPHAS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
# a smoothed layer must cut its output error at least this much to pay for its multiply
MIN_ERROR_RATIO = 0.8
# the smoothed float layer (input / s, weight * s) must give the float layer's output to this SQNR
MIN_FUNCTION_SQNR_DB = 60.0

# (float Linear, smoothing or None) -> that layer's int8 kernel as a callable on float inputs
KernelFactory = Callable[[nn.Linear, torch.Tensor | None], Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class SmoothingChoice:
    """One layer's measured choice: alpha (None: not smoothed), its int8 output error relative to none,
    and how exactly the smoothed float layer computes the float layer (SQNR, worst call)."""

    layer: str
    alpha: float | None
    error_ratio: float
    function_sqnr_db: float = float("inf")


def smoothing_factors(input_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha), bounded away from zero (dead channels keep 1)."""
    weight_absmax = weight.detach().abs().amax(dim=0).clamp(min=1e-5)
    factors = input_absmax.clamp(min=1e-5).pow(alpha) / weight_absmax.pow(1 - alpha)
    return torch.where(input_absmax > 0, factors.clamp(min=1e-5), torch.ones_like(factors))


# Inputs of the measured layers are kept from the first pass over the calibration batches while they hold
# at most this many values (256 MB), so that the choice needs no second pass (a CNN's classifier head);
# beyond it (a transformer's every Linear), the batches run a second time.
KEPT_INPUT_VALUES = 64 * 2**20


def _channel_absmax(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()


def _first_pass(model: nn.Module, linears: Mapping[str, nn.Linear], batches: Sequence[tuple]
                ) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]] | None]:
    """Per layer: the largest |input| of each input channel, and every call's input (None when they would
    hold more than KEPT_INPUT_VALUES values)."""
    absmax: dict[str, torch.Tensor] = {}
    inputs: dict[str, list[torch.Tensor]] | None = {name: [] for name in linears}
    kept = 0

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            nonlocal inputs, kept
            x = args[0].detach()
            channels = _channel_absmax(x)
            absmax[name] = torch.maximum(absmax[name], channels) if name in absmax else channels
            if inputs is not None:
                kept += x.numel()
                if kept > KEPT_INPUT_VALUES:
                    inputs = None
                else:
                    inputs[name].append(x.clone())
        return hook

    handles = [linear.register_forward_pre_hook(record(name)) for name, linear in linears.items()]
    try:
        run_batches(model, batches)
    finally:
        for handle in handles:
            handle.remove()
    return absmax, inputs


def choose_smoothing(model: nn.Module, linears: Mapping[str, nn.Linear], batches: Sequence[tuple],
                     kernel: KernelFactory, unsmoothed: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                     known_inputs: Mapping[str, Sequence[torch.Tensor]] | None = None
                     ) -> tuple[dict[str, torch.Tensor], list[SmoothingChoice]]:
    """Per layer of `linears` (submodules of the float `model`, by name): the smoothing factors that bring
    its int8 output (`kernel`) closest to its float output on `batches`, if any brings it below
    MIN_ERROR_RATIO of the unsmoothed error; the unsmoothed int8 layer is `kernel(linear, None)` unless
    `unsmoothed` gives it (e.g. weights already rounded by optimize_rounding). Returns the factors by
    layer and every layer's measured choice. Where `known_inputs` holds every layer's calibration inputs
    (the simulation walk's), they are used instead of a pass over `batches`."""
    if known_inputs is not None and all(name in known_inputs for name in linears):
        inputs = {name: list(known_inputs[name]) for name in linears}
        absmax = {name: torch.stack([_channel_absmax(x) for x in xs]).amax(0) for name, xs in inputs.items() if xs}
    else:
        absmax, inputs = _first_pass(model, linears, batches)
    candidates = {name: {alpha: smoothing_factors(absmax[name], linear.weight, alpha) for alpha in ALPHAS}
                  for name, linear in linears.items() if name in absmax}
    kernels = {name: {alpha: kernel(linears[name], factors) for alpha, factors in by_alpha.items()}
               | {None: (unsmoothed or {}).get(name) or kernel(linears[name], None)}
               for name, by_alpha in candidates.items()}
    errors = {name: dict.fromkeys(by_alpha, 0.0) for name, by_alpha in kernels.items()}
    function_sqnr = {name: dict.fromkeys(by_alpha, float("inf")) for name, by_alpha in candidates.items()}

    def measure(name: str, x: torch.Tensor, output: torch.Tensor) -> None:
        layer = linears[name]
        for alpha, run in kernels[name].items():
            errors[name][alpha] += float((run(x) - output).pow(2).sum())
        for alpha, factors in candidates[name].items():  # the rewrite itself, in float
            smoothed = F.linear(x / factors, layer.weight * factors, layer.bias)
            function_sqnr[name][alpha] = min(function_sqnr[name][alpha], sqnr_db(output, smoothed))

    if inputs is not None:
        with torch.no_grad():
            for name in kernels:
                for x in inputs[name]:
                    measure(name, x, linears[name](x))
    else:
        handles = [linears[name].register_forward_hook(
            lambda module, args, output, name=name: measure(name, args[0], output)) for name in kernels]
        try:
            run_batches(model, batches)
        finally:
            for handle in handles:
                handle.remove()
    factors, choices = {}, []
    for name, by_alpha in errors.items():
        plain = by_alpha.pop(None)
        exact = {alpha: error for alpha, error in by_alpha.items() if function_sqnr[name][alpha] >= MIN_FUNCTION_SQNR_DB}
        alpha = min(exact, key=exact.__getitem__) if exact else None
        ratio = exact[alpha] / plain if alpha is not None and plain > 0 else 1.0
        if alpha is not None and ratio < MIN_ERROR_RATIO:
            factors[name] = candidates[name][alpha]
            choices.append(SmoothingChoice(name, alpha, ratio, function_sqnr[name][alpha]))
        else:
            choices.append(SmoothingChoice(name, None, 1.0))
    return factors, choices
