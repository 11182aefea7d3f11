"""fxq.save / fxq.load round trips for models written the way user code often is."""

from __future__ import annotations  # on purpose: the forward's annotations below are strings (PEP 563)

import pytest
import torch
from torch import nn

import fxq


class PostponedAnnotations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(x)).mean((2, 3)))


def test_model_with_string_annotations_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = PostponedAnnotations().eval()
    calibration = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    quantized = fxq.quantize(model, calibration[0][:1], calibration_data=calibration, optimize_rounding=False)
    loaded = fxq.load(fxq.save(quantized, tmp_path / "model.pt"))
    with torch.no_grad():
        assert torch.equal(loaded(calibration[1]), quantized(calibration[1]))
