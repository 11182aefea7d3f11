"""The engine choice on this CPU: which grid keeps the int8 kernels from saturating."""

from __future__ import annotations

import pytest
import torch

from fxq.backend import engine
from fxq.config import QuantOptions


@pytest.mark.parametrize("name", engine.available_engines())
def test_seven_bit_weights_sum_exactly_on_every_engine(name):
    # 255 * 64 * 2 = 32640 fits a 16-bit pair sum, so 8-bit activations are safe with 7-bit weights
    assert engine.sums_exactly(name, 64) and engine.sums_exactly(name, -64)
    assert engine.probe_kernel_saturation(name) == (not engine.sums_exactly(name, 127))


def test_a_saturating_kernel_gets_seven_bit_weights_and_eight_bit_activations():
    choice = engine.select_engine(QuantOptions.from_kwargs(mode="static", backend="x86"))
    assert not choice.reduce_range
    assert choice.seven_bit_weights == choice.kernel_saturates
    assert ("weights are 7-bit" in choice.reason) == choice.kernel_saturates
    requested = engine.select_engine(QuantOptions.from_kwargs(mode="static", backend="x86", reduce_range=True))
    assert requested.reduce_range and not requested.seven_bit_weights  # 7-bit activations: weights stay 8-bit


def test_weight_grid_bounds_follow_the_choice():
    weight = torch.randn(8, 4, 3, 3)
    for seven_bit, (low, high) in ((False, (-128, 127)), (True, (-64, 64))):
        grid = engine.WeightGrid(per_channel=True, seven_bit=seven_bit)
        scale, quant_min, quant_max = engine.weight_qparams(weight, grid)
        assert (quant_min, quant_max) == (low, high)
        codes = engine.fake_quantize_weight(weight, grid) / scale.view(-1, 1, 1, 1)
        assert codes.round().min() >= low and codes.round().max() <= high
        assert codes.abs().amax(dim=(1, 2, 3)).min() >= high - 1  # each channel spans its grid
