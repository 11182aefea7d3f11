"""Inputs by name (as Hugging Face models take them) and dynamic mode on a model whose forward does not trace."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxq
from fxq.backend.op_kinds import is_dynamic_quantized_module, weighted_layers
from helpers import assert_state_unchanged, sqnr, state_snapshot


class DataDependent(nn.Module):
    """An encoder-like head whose forward branches on data (FX cannot trace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(32, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.head = nn.Linear(64, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                scale: float = 1.0) -> dict[str, torch.Tensor]:
        hidden = self.embed(input_ids) * scale
        if attention_mask is None or bool(attention_mask.all()):  # data-dependent control flow
            hidden = hidden + self.mlp(hidden)
        else:
            hidden = hidden * attention_mask.unsqueeze(-1)
        return {"logits": self.head(hidden)}


class Traceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids) * attention_mask.unsqueeze(-1)


def _batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randn(4, 10, 32, generator=generator), "attention_mask": torch.ones(4, 10)}


def test_dynamic_mode_swaps_layers_of_a_model_whose_forward_does_not_trace():
    torch.manual_seed(0)
    model = DataDependent().eval()
    snapshot = state_snapshot(model)
    quantized = fxq.quantize(model, _batch(0), mode="dynamic", dynamic_where_faster=False)
    assert_state_unchanged(model, snapshot)
    dynamic = [name for name, module in quantized.named_modules() if is_dynamic_quantized_module(module)]
    assert dynamic == ["embed", "mlp.0", "mlp.2", "head"]
    assert weighted_layers(quantized).float == []
    summary = fxq.summary_of(quantized)
    assert any("does not trace" in note for note in summary.notes), summary.notes
    batch = _batch(1)
    with torch.no_grad():
        expected, actual = model(**batch)["logits"], quantized(**batch)["logits"]
    assert sqnr(expected, actual) > 25.0


def test_dynamic_mode_without_a_trace_honours_keep_float():
    quantized = fxq.quantize(DataDependent().eval(), _batch(0), mode="dynamic", keep_float=["head"],
                             dynamic_where_faster=False)
    assert isinstance(quantized.head, nn.Linear)
    assert fxq.summary_of(quantized).float_layers == [("head", "keep_float")]


def test_static_mode_takes_example_inputs_and_batches_by_name():
    torch.manual_seed(0)
    model = Traceable().eval()
    batches = [_batch(seed) for seed in range(4)]
    quantized = fxq.quantize(model, batches[0], calibration_data=batches)
    assert weighted_layers(quantized).int8 and not weighted_layers(quantized).float
    evaluation = _batch(9)
    with torch.no_grad():
        expected = model(**evaluation)
        assert sqnr(expected, quantized(**evaluation)) > 25.0  # the int8 graph keeps forward's names
        assert torch.equal(quantized(**evaluation), quantized(evaluation["input_ids"], evaluation["attention_mask"]))


def test_a_name_forward_does_not_take_is_refused_with_the_valid_names():
    with pytest.raises(fxq.InputError, match=r"has no parameter 'token_ids'; its parameters are input_ids, attention_mask"):
        fxq.quantize(Traceable().eval(), {"token_ids": torch.randn(1, 10, 32)}, mode="dynamic")


def test_a_skipped_parameter_takes_its_default():
    model = DataDependent().eval()
    batch = {"input_ids": torch.randn(2, 10, 32), "scale": 2.0}  # attention_mask=None between them
    quantized = fxq.quantize(model, batch, mode="dynamic")
    with torch.no_grad():
        assert sqnr(model(**batch)["logits"], quantized(**batch)["logits"]) > 25.0
