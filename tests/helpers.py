"""Small numeric helpers shared by the tests."""

from __future__ import annotations

import math

import torch
from torch import nn

from fxq.analysis.metrics import sqnr_db


def sqnr(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """fxq.analysis.metrics.sqnr_db (dB; infinite when the two are equal), except that it is NaN when either
    tensor holds non-finite values, so that an `sqnr(...) > floor` assertion fails instead of raising."""
    if not (torch.isfinite(reference).all() and torch.isfinite(approximation).all()):
        return math.nan
    return sqnr_db(reference, approximation)


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


PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)


def small_mobilenet(mobilenet: nn.Module) -> nn.Module:
    """MobileNetV2's stem and first four inverted residual blocks (two with a skip), plus a linear head."""
    torch.manual_seed(0)
    return nn.Sequential(*mobilenet.features[:5], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def photo_batches() -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two calibration batches of 8 and one evaluation batch of 8 photographic 64x64 crops."""
    from fxq.samples import random_crops

    return list(random_crops(16, seed=1, size=64).split(8)), random_crops(8, seed=2, size=64)


def same_value(a, b) -> bool:
    """Bit equality of state_dict values: quantized tensors by int8 values and quantization parameters."""
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if not isinstance(a, torch.Tensor):
        return a == b
    if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_quantized:
        return torch.equal(a, b)
    if a.qscheme() != b.qscheme() or not torch.equal(a.int_repr(), b.int_repr()):
        return False
    if a.qscheme() in PER_CHANNEL:
        return (a.q_per_channel_axis() == b.q_per_channel_axis()
                and torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales())
                and torch.equal(a.q_per_channel_zero_points(), b.q_per_channel_zero_points()))
    return a.q_scale() == b.q_scale() and a.q_zero_point() == b.q_zero_point()


def differing_entries(first: dict, second: dict) -> list[str]:
    assert first.keys() == second.keys()
    return [name for name in first if not same_value(first[name], second[name])]
