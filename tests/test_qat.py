"""Quantization-aware training on scikit-learn's handwritten digits (8x8 images, 1797 samples)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxq
from fxq.backend.dynamic_linear import DynamicLinear
from qat_digits import DigitsNet, accuracy, digits_split, train_epoch, train_qat
from helpers import assert_state_unchanged, state_snapshot

FLOAT_EPOCHS = 6
QAT_EPOCHS = 3  # ranges and BatchNorm statistics frozen in the last one
MIN_FLOAT_ACCURACY = 0.95
MAX_ACCURACY_DROP = 0.01


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return digits_split()


def test_qat_int8_accuracy_within_one_point_of_float(digits):
    train_x, train_y, test_x, test_y = digits
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(FLOAT_EPOCHS):
        train_epoch(model, optimizer, train_x, train_y, generator)
    model.eval()
    float_accuracy = accuracy(model, test_x, test_y)
    assert float_accuracy >= MIN_FLOAT_ACCURACY

    snapshot = state_snapshot(model)
    qat_model = fxq.prepare_qat(model, train_x[:32])
    assert_state_unchanged(model, snapshot)
    assert not model.training
    train_qat(qat_model, train_x, train_y, generator, epochs=QAT_EPOCHS)
    int8_model = fxq.convert(qat_model)
    int8_accuracy = accuracy(int8_model, test_x, test_y)
    print(f"digits: float {float_accuracy:.4f}, QAT int8 {int8_accuracy:.4f}")
    assert int8_accuracy >= float_accuracy - MAX_ACCURACY_DROP
    int8_convs = [m for m in int8_model.modules() if type(m).__module__.startswith("torch.ao.nn.intrinsic.quantized")]
    assert len(int8_convs) == 2
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) for m in int8_model.modules())
    # the returned classifier runs as a dynamic int8 linear: float logits, not rounded to 8 bits
    assert isinstance(int8_model.get_submodule("classifier"), DynamicLinear)
    assert any(r.endswith(": classifier") for r in fxq.summary_of(int8_model).rewrites)


def test_frozen_qat_model_stops_updating_ranges_and_bn_stats(digits):
    train_x, train_y, _, _ = digits
    torch.manual_seed(0)
    qat_model = fxq.prepare_qat(DigitsNet().eval(), train_x[:8])
    train_epoch(qat_model, torch.optim.SGD(qat_model.parameters(), lr=0.0), train_x[:64], train_y[:64],
                torch.Generator().manual_seed(0))
    fxq.freeze_observers(qat_model)
    fxq.freeze_bn_stats(qat_model)
    frozen = {name: tensor.clone() for name, tensor in qat_model.state_dict().items()
              if "running_" in name or name.endswith((".scale", ".zero_point", "min_val", "max_val"))}
    assert any("running_mean" in name for name in frozen) and any(name.endswith(".scale") for name in frozen)
    train_epoch(qat_model, torch.optim.SGD(qat_model.parameters(), lr=0.0), train_x[64:256] * 3.0,
                train_y[64:256], torch.Generator().manual_seed(1))
    after = qat_model.state_dict()
    assert all(torch.equal(after[name], before) for name, before in frozen.items())


def test_convert_rejects_a_model_not_from_prepare_qat():
    with pytest.raises(fxq.InputError, match="prepare_qat"):
        fxq.convert(DigitsNet())


def test_convert_unwraps_a_data_parallel_wrapper(digits):
    train_x, _, test_x, _ = digits
    torch.manual_seed(0)
    qat_model = fxq.prepare_qat(DigitsNet().eval(), train_x[:8])
    wrapped = nn.DataParallel(qat_model)  # DistributedDataParallel wraps the same way (examples/qat_ddp.py)
    int8_model = fxq.convert(wrapped)
    reference = fxq.convert(qat_model)
    with torch.no_grad():
        assert torch.equal(int8_model(test_x[:16]), reference(test_x[:16]))
