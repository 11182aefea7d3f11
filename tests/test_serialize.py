"""fxq.save / fxq.load round trips for models written the way user code often is."""

from __future__ import annotations  # on purpose: the forward's annotations below are strings (PEP 563)

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


def test_a_file_from_another_fxq_version_loads_with_its_unknown_summary_fields_noted(tmp_path):
    """Summary fields change between versions (eight_bit_weight_layers became eight_bit_weight_channels);
    the model in an older file must still load, and its summary say what was left out."""
    import json

    model = PostponedAnnotations().eval()
    calibration = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    quantized = fxq.quantize(model, calibration[0][:1], calibration_data=calibration, optimize_rounding=False)
    path = fxq.save(quantized, tmp_path / "model.pt")
    extra = {"fxq.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["fxq.json"])
    meta["summary"]["eight_bit_weight_layers"] = ["conv"]
    torch.jit.save(scripted, str(path), _extra_files={"fxq.json": json.dumps(meta)})
    loaded = fxq.load(path)
    notes = fxq.summary_of(loaded).notes
    assert any("eight_bit_weight_layers" in note for note in notes), notes
    with torch.no_grad():
        assert torch.equal(loaded(calibration[1]), quantized(calibration[1]))
