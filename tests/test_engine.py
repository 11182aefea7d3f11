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


def test_a_layer_grid_mixes_eight_and_seven_bit_channels():
    """On a saturating kernel, the channels measured not to overflow keep 8 bits (backend.weight_bits):
    their codes span -128..127, the others' -64..64, in the converted weight and in every rounding pass."""
    weight = torch.randn(6, 4, 3, 3)
    grid = engine.WeightGrid(per_channel=True, seven_bit=True, eight_bit_channels={"conv": frozenset({1, 4})})
    scale, quant_min, quant_max = engine.weight_qparams(weight, grid.of("conv"))
    assert quant_max.tolist() == [64, 127, 64, 64, 127, 64] and quant_min.tolist() == [-64, -128, -64, -64, -128, -64]
    largest = (engine.fake_quantize_weight(weight, grid.of("conv")) / scale.view(-1, 1, 1, 1)).abs().amax((1, 2, 3))
    assert torch.allclose(largest, quant_max, atol=1.0)
    other = engine.weight_qparams(weight, grid.of("other"))  # a layer not measured stays on 7 bits
    assert (other[1], other[2]) == (-64, 64)
    observer = grid.of("conv").observer()()
    observer(weight)
    codes = torch.quantize_per_channel(weight, observer.calculate_qparams()[0], torch.zeros(6, dtype=torch.long), 0,
                                       torch.qint8).int_repr().abs().flatten(1).amax(1)
    assert codes.tolist()[1] >= 127 and codes.tolist()[4] >= 127 and max(codes[[0, 2, 3, 5]].tolist()) <= 64


def test_x86_replaces_onednn_only_where_its_fbgemm_depthwise_convs_are_not_slow():
    """Without a conv feeding a residual add, auto takes x86 unless x86 would run depthwise convs on fbgemm
    slower in int8 than in float; the depthwise convs are timed only when the switch would happen."""
    from fxq.backend.kernel_choice import engine_for_graph

    if not {"x86", "onednn"} <= set(torch.backends.quantized.supported_engines):
        pytest.skip("needs the x86 and onednn engines")
    saturates = engine.probe_kernel_saturation("onednn")
    if engine.probe_kernel_saturation("x86") != saturates:
        pytest.skip("the two engines' kernels saturate differently here: onednn is kept for its grids")
    onednn = engine.EngineChoice("onednn", reduce_range=False, kernel_saturates=saturates, reason="auto")
    options = QuantOptions()
    timed = []

    def slow(names: list[str]):
        return lambda: timed.append(names) or names

    assert engine_for_graph(onednn, options, has_conv_adds=False, fbgemm_depthwise=slow([])).engine == "x86"
    kept = engine_for_graph(onednn, options, has_conv_adds=False, fbgemm_depthwise=slow(["blocks.0.conv_dw"]))
    assert kept.engine == "onednn" and "(blocks.0.conv_dw) on fbgemm, slower in int8" in kept.reason
    assert engine_for_graph(onednn, options, has_conv_adds=True, fbgemm_depthwise=slow(["x"])).engine == "onednn"
    assert timed == [[], ["blocks.0.conv_dw"]]  # not timed where a conv feeds an add
