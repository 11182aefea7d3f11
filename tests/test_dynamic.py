"""Dynamic quantization: int8 weights for LSTM and Linear, activations quantized per call."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd

import fxq
from fxq.backend import engine
from fxq.backend.dynamic_linear import DynamicLinear
from helpers import assert_state_unchanged, sqnr, state_snapshot

# Observed about 43 dB on these inputs when this was written; the floor leaves margin.
DYNAMIC_SQNR_FLOOR_DB = 30.0


class SequenceTagger(nn.Module):
    """Per-step logits from an LSTM's output sequence (unpacks the LSTM's (output, (h, c)) tuple)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps, _ = self.lstm(x)
        return self.head(steps)


class SequenceClassifier(nn.Module):
    """Logits from the last layer's final hidden state (indexes into the nested state tuple)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, 64, batch_first=True)
        self.hidden = nn.Linear(64, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(x)
        return self.head(torch.relu(self.hidden(hidden[-1])))


class RawLSTM(nn.Module):
    """Returns the LSTM's whole (output, (h, c)) tuple to the caller."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, 64, batch_first=True)

    def forward(self, x: torch.Tensor):
        return self.lstm(x)


def build(model_class: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return model_class().eval()


@pytest.mark.parametrize("model_class,linears", [(SequenceTagger, 1), (SequenceClassifier, 2)])
def test_lstm_and_linear_become_dynamic_int8(model_class, linears):
    model = build(model_class)
    snapshot = state_snapshot(model)
    quantized = fxq.quantize(model, torch.randn(2, 7, 32), mode="dynamic", dynamic_where_faster=False)
    assert_state_unchanged(model, snapshot)
    kinds = [type(m) for m in quantized.modules()]
    assert kinds.count(nnqd.LSTM) == 1
    # fxq's dynamic Linear: torch.ao's kernel, on the input grid the engine probe allows
    assert kinds.count(DynamicLinear) == linears
    choice = engine.select_engine(fxq.QuantOptions())
    assert all(m.reduce_range == choice.dynamic_reduce_range for m in quantized.modules() if isinstance(m, DynamicLinear))
    assert not any(type(m) in (nn.LSTM, nn.Linear) for m in quantized.modules())

    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 20, 32, generator=generator)  # other batch and length than the example
    with torch.no_grad():
        expected, actual = model(inputs), quantized(inputs)
    assert actual.shape == expected.shape
    measured = sqnr(expected, actual)
    print(f"{model_class.__name__} dynamic SQNR: {measured:.1f} dB")
    assert measured >= DYNAMIC_SQNR_FLOOR_DB


def test_lstm_tuple_output_passes_through():
    model = build(RawLSTM)
    quantized = fxq.quantize(model, torch.randn(2, 7, 32), mode="dynamic", dynamic_where_faster=False)
    inputs = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        (steps, (hidden, cell)), (q_steps, (q_hidden, q_cell)) = model(inputs), quantized(inputs)
    assert q_steps.shape == steps.shape == (3, 9, 64)
    assert q_hidden.shape == hidden.shape and q_cell.shape == cell.shape
    for expected, actual in ((steps, q_steps), (hidden, q_hidden), (cell, q_cell)):
        assert sqnr(expected, actual) >= DYNAMIC_SQNR_FLOOR_DB


def test_dynamic_needs_no_calibration_data_and_records_a_summary():
    quantized = fxq.quantize(build(SequenceTagger), torch.randn(1, 4, 32), mode="dynamic",
                             dynamic_where_faster=False)
    summary = fxq.summary_of(quantized)
    assert summary is not None
    assert summary.options["mode"] == "dynamic"
    assert summary.float_layers == []


class WideAndNarrow(nn.Module):
    """A wide Linear over many rows (int8 pays) beside a narrow LSTM (timed here as slower in int8)."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(1024, 1024)
        self.lstm = nn.LSTM(1024, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps, _ = self.lstm(self.wide(x))
        return steps


def test_dynamic_layers_slower_than_float_go_back_to_float_and_are_listed(monkeypatch):
    """The decision follows the timings (stubbed here so the test does not depend on this CPU's load)."""
    from fxq.backend import dynamic_payoff

    def timings(model, example_inputs, names, **_):
        int8 = any(isinstance(m, nnqd.LSTM) for m in model.modules())
        return {"wide": 300.0 if int8 else 1000.0, "lstm": 900.0 if int8 else 400.0}

    monkeypatch.setattr(dynamic_payoff, "module_times_us", timings)
    model = build(WideAndNarrow)
    quantized = fxq.quantize(model, torch.randn(1, 32, 1024), mode="dynamic")
    assert isinstance(quantized.get_submodule("wide"), DynamicLinear)
    assert type(quantized.get_submodule("lstm")) is nn.LSTM
    (layer, why), = fxq.summary_of(quantized).float_layers
    assert layer == "lstm" and "not faster than float" in why and "900 us vs 400 us" in why
    with torch.no_grad():
        inputs = torch.randn(2, 16, 1024, generator=torch.Generator().manual_seed(3))
        assert sqnr(model(inputs), quantized(inputs)) >= DYNAMIC_SQNR_FLOOR_DB


def test_a_wide_linear_times_faster_in_int8_and_stays_int8():
    """Real timings: a 1024x1024 Linear over 32 rows is several times faster as dynamic int8 on any CPU
    with int8 kernels, well past the noise of a loaded machine."""
    quantized = fxq.quantize(build(WideAndNarrow), torch.randn(1, 32, 1024), mode="dynamic")
    assert isinstance(quantized.get_submodule("wide"), DynamicLinear)
    assert "dynamic_payoff" in fxq.summary_of(quantized).timings_s


@pytest.mark.parametrize("fast_engine", ["onednn", "x86"])
def test_a_model_with_only_dynamic_int8_layers_runs_on_the_engine_timed_fastest(monkeypatch, fast_engine):
    """The timings are stubbed: each layer call takes 100 us on `fast_engine` and 200 us on any other, so the
    choice is the timings', not this CPU's load."""
    from fxq.backend import dynamic_payoff
    from fxq.backend.kernel_choice import same_grid_engines

    first = engine.select_engine(fxq.config.QuantOptions()).engine
    if fast_engine not in same_grid_engines(first):
        pytest.skip(f"{fast_engine} does not take {first}'s grids on this CPU")

    def call_us(module, args, repeats=5):
        return 100.0 if torch.backends.quantized.engine == fast_engine else 200.0

    monkeypatch.setattr(dynamic_payoff, "fastest_call_us", call_us)
    # the float-or-int8 payoff: equal times, so every layer stays int8
    monkeypatch.setattr(dynamic_payoff, "module_times_us", lambda model, inputs, names, **_: dict.fromkeys(names, 1.0))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 64)).eval()
    quantized = fxq.quantize(model, torch.randn(1, 32, 1024), mode="dynamic", dynamic_where_faster=True)
    summary = fxq.summary_of(quantized)
    assert summary.engine == fast_engine == torch.backends.quantized.engine
    assert "the only int8 layers are dynamic" in (summary.engine_reason + " ".join(summary.notes))
    with torch.no_grad():
        inputs = torch.randn(2, 16, 1024, generator=torch.Generator().manual_seed(3))
        assert sqnr(model(inputs), quantized(inputs)) >= DYNAMIC_SQNR_FLOOR_DB


def test_a_linear_followed_by_relu_quantizes_dynamic():
    """torch.ao's prepare_fx refused to fuse a dynamic Linear with the ReLU after it (LookupError)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
    quantized = fxq.quantize(model, torch.randn(4, 256), mode="dynamic", dynamic_where_faster=False)
    assert sum(isinstance(m, DynamicLinear) for m in quantized.modules()) == 2
    with torch.no_grad():
        inputs = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
        assert sqnr(model(inputs), quantized(inputs)) >= DYNAMIC_SQNR_FLOOR_DB
