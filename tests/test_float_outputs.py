"""A linear layer whose output the model returns runs as a dynamic int8 kernel: no 8-bit rounding of the output."""

from __future__ import annotations

import torch
import torch.ao.nn.quantized as nnq
from torch import nn

import fxq
from fxq.backend.dynamic_linear import DynamicLinear
from fxq.backend.engine import using_engine
from helpers import photo_batches, small_mobilenet, sqnr


class TwoHeads(nn.Module):
    """A returned linear head, and one whose output is also used again (it must stay static)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body, self.head, self.hidden = body, nn.Linear(32, 64), nn.Linear(32, 32)

    def forward(self, x):
        features = self.body(x)
        hidden = self.hidden(features)
        return self.head(features), hidden, hidden.relu()


def test_the_returned_linear_runs_dynamic_and_its_output_is_not_rounded_to_eight_bits(mobilenet):
    body = nn.Sequential(*small_mobilenet(mobilenet)[:-1])
    model = TwoHeads(body).eval()
    calibration, evaluation = photo_batches()
    quantized = fxq.quantize(model, (evaluation[:1],), calibration_data=calibration)
    summary = fxq.summary_of(quantized)
    assert type(quantized.get_submodule("head")) is DynamicLinear
    assert type(quantized.get_submodule("hidden")) is nnq.Linear  # its output is read again: stays static
    assert any("dynamic int8" in rewrite and rewrite.endswith(": head") for rewrite in summary.rewrites)
    with torch.no_grad(), using_engine(summary.engine):
        logits, hidden, _ = quantized(evaluation)
        reference = model(evaluation)[0]
    # a static int8 output holds at most 256 distinct values (its grid); the dynamic kernel returns float
    assert logits.numel() == 512 and logits.unique().numel() > 256
    codes = hidden / quantized.get_submodule("hidden").scale
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert sqnr(reference, logits) >= 20.0
