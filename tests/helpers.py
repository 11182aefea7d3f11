"""Small numeric helpers shared by the tests."""

from __future__ import annotations

import math

import torch


def sqnr(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(|reference| / |reference - approximation|).

    Infinite when the two are equal; NaN when either holds non-finite values (so `> floor` fails).
    """
    reference = reference.detach().double()
    noise = (reference - approximation.detach().double()).norm()
    signal = reference.norm()
    if not (torch.isfinite(signal) and torch.isfinite(noise)):
        return math.nan
    if noise == 0:
        return math.inf
    return float(20 * torch.log10(signal / noise))


def state_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer, to check later that a model was not touched."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_state_unchanged(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert current.keys() == snapshot.keys()
    for name, before in snapshot.items():
        after = current[name]
        assert after.dtype == before.dtype and after.device == before.device, name
        assert after.shape == before.shape, name
        if after.device.type != "meta":  # meta tensors hold no values to compare
            assert torch.equal(after, before), f"{name} changed"
