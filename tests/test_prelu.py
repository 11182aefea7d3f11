"""int8 PReLU: its slopes go on a grid holding 1.0, since the kernel computes the positive side with it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxq
from fxq.backend.prelu_slopes import PReLUSlopeObserver
from helpers import sqnr


@pytest.mark.parametrize("low, high", [(-0.67, 0.05), (0.1, 0.5), (-1.3, 1.1), (0.0, 0.0)])
def test_the_slope_grid_holds_one_exactly_and_every_slope_within_half_a_step(low, high):
    slopes = torch.linspace(low, high, 64)
    observer = PReLUSlopeObserver()
    observer(slopes)
    scale, zero_point = (float(v) for v in observer.calculate_qparams())
    one = torch.quantize_per_tensor(torch.tensor([1.0]), scale, int(zero_point), torch.quint8)
    assert float(one.dequantize()) == pytest.approx(1.0, abs=1e-6)
    on_grid = torch.quantize_per_tensor(slopes, scale, int(zero_point), torch.quint8).dequantize()
    assert (on_grid - slopes).abs().max() <= scale / 2 + 1e-6


class ConvPReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.act = nn.PReLU(16)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)))


def test_int8_prelu_with_slopes_below_one_keeps_its_positive_side():
    torch.manual_seed(0)
    model = ConvPReLU().eval()
    with torch.no_grad():  # trained slopes: MTCNN's RNet has them in [-0.67, 0.05]
        model.act.weight.copy_(torch.linspace(-0.6, 0.05, 16))
    batches = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    quantized = fxq.quantize(model, (batches[0][:1],), calibration_data=batches)
    assert type(quantized.act).__module__.startswith("torch.ao.nn.quantized")  # the int8 kernel runs
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        # 36.2 dB measured; 3.7 dB with the slopes on a min-max grid, PyTorch's default
        assert sqnr(model(x), quantized(x)) > 30


def test_qat_converts_prelu_slopes_onto_the_same_grid():
    torch.manual_seed(0)
    model = ConvPReLU()
    with torch.no_grad():
        model.act.weight.copy_(torch.linspace(-0.6, 0.05, 16))
    batches = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    prepared = fxq.prepare_qat(model, (batches[0][:1],))
    with torch.no_grad():  # observers and fake quantization see data in train mode, as in training
        for batch in batches:
            prepared(batch)
    quantized = fxq.convert(prepared)
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        # 36.0 dB measured; 3.8 dB with torch.ao's default QAT qconfig for PReLU (min-max slopes)
        assert sqnr(model.eval()(x), quantized(x)) > 30


@pytest.mark.parametrize("stage, size", [("RNet", 24), ("ONet", 48)])
def test_trained_mtcnn_stages_keep_their_face_decisions(stage, size):
    """facenet-pytorch's trained MTCNN (PReLU after every layer) on photo crops at the stage's window size.

    PyTorch's FX default measured 1.8 dB (RNet) and 8.1 dB (ONet) on bench/trained.py's 256 crops, with the
    face decision agreeing on 3% and 2% of them; fxq 30.9 and 36.4 dB, 100%.
    """
    from facenet_pytorch.models import mtcnn

    from fxq.samples import mtcnn_crops

    model = getattr(mtcnn, stage)().eval()
    calibration = list(mtcnn_crops(32, seed=1, size=size).split(16))
    evaluation = mtcnn_crops(64, seed=2, size=size)
    quantized = fxq.quantize(model, (calibration[0][:1],), calibration_data=calibration)
    with torch.no_grad():
        reference, outputs = model(evaluation), quantized(evaluation)
    assert sqnr(torch.cat([r.flatten(1) for r in reference], 1), torch.cat([o.flatten(1) for o in outputs], 1)) > 25
    assert float((reference[-1].argmax(1) == outputs[-1].argmax(1)).float().mean()) >= 0.95
