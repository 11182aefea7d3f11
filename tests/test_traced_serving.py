"""Models quantized by regions or module swaps run a checked trace per input signature (backend.traced_serving)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxq
from fxq.backend import traced_serving
from fxq.backend.traced_serving import traced_forward_of


class ShapeLoop(nn.Module):
    """A forward FX cannot trace (a Python loop over a tensor's length, keyword inputs, a dict out), whose
    path depends only on shapes: one trace per signature stands for every call of that signature."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.norm = nn.LayerNorm(64)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(2))
        self.head = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0) -> dict:
        h = self.norm(self.embed(x))
        for _ in range(int(x.shape[1]) // 8):  # shape-dependent Python
            for block in self.blocks:
                h = h + block(h)
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return {"out": self.head(h) * scale, "pooled": h.mean(1)}


class ValueBranch(ShapeLoop):
    """The same layers, but the path depends on the input's values: no single trace stands for it."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0) -> dict:
        out = super().forward(x, mask, scale)
        if bool(x.mean() > 0):
            out["out"] = out["out"] + 1.0
        return out


class GeluLoop(ShapeLoop):
    """GELU runs in float, so every Linear's input is quantized for it alone: static mode runs them dynamic."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(2))


def _batches(count: int, length: int = 16, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(4, length, 16, generator=generator) + 0.5,
             "mask": (torch.rand(4, length, generator=generator) > 0.2).float()} for _ in range(count)]


def _python(model: nn.Module, **inputs) -> dict:
    return type(model).forward(model, **inputs)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_a_model_fx_cannot_trace_runs_its_checked_trace(mode):
    torch.manual_seed(0)
    model = ShapeLoop().eval()
    calibration = _batches(4)
    quantized = fxq.quantize(model, calibration[0], mode=mode, calibration_data=calibration)
    assert any("runs a trace of its forward" in note for note in fxq.summary_of(quantized).notes)
    served = traced_forward_of(quantized)
    assert served is not None
    with torch.no_grad():
        for inputs in _batches(3, seed=1) + _batches(2, length=24, seed=2):  # a second signature: longer input
            out = quantized(**inputs)
            expected = _python(quantized, **inputs)
            assert out.keys() == expected.keys()
            assert all(torch.equal(out[key], expected[key]) for key in out)
        assert len([t for t in served.traces.values() if t is not traced_serving._NO_TRACE]) >= 2
        # a non-tensor argument is part of the signature
        halved = quantized(**calibration[1], scale=0.5)
        assert torch.equal(halved["out"], _python(quantized, **calibration[1], scale=0.5)["out"])


def test_a_forward_that_branches_on_values_keeps_python():
    torch.manual_seed(0)
    model = ValueBranch().eval()
    calibration = _batches(4)
    quantized = fxq.quantize(model, calibration[0], mode="dynamic", calibration_data=calibration)
    assert any("takes another path for other input values" in note for note in fxq.summary_of(quantized).notes)
    assert traced_forward_of(quantized) is None
    with torch.no_grad():
        for sign in (1.0, -1.0):
            inputs = {"x": sign * calibration[1]["x"], "mask": calibration[1]["mask"]}
            assert torch.equal(quantized(**inputs)["out"], _python(quantized, **inputs)["out"])


def test_hooks_and_training_run_python_and_changed_models_trace_afresh():
    torch.manual_seed(0)
    model = ShapeLoop().eval()
    calibration = _batches(4)
    quantized = fxq.quantize(model, calibration[0], mode="dynamic", calibration_data=calibration)
    served = traced_forward_of(quantized)
    inputs = calibration[1]

    def served_equals_python() -> bool:
        return torch.equal(quantized(**inputs)["out"], _python(quantized, **inputs)["out"])

    with torch.no_grad():
        assert served_equals_python() and served_equals_python()  # traced on the first call, run on the second
        seen = []
        handle = quantized.head.register_forward_hook(lambda *_: seen.append(1))
        quantized(**inputs)
        handle.remove()
        assert seen == [1]  # the hook ran: the Python forward did
        quantized.train()
        assert not served.state.plain_call()
        quantized.eval()
        assert served.state.plain_call()

        before = served.state
        quantized.head = nn.Linear(64, 8)  # a replaced submodule: traced afresh
        assert not before.same_model()
        assert served_equals_python() and served_equals_python()
        assert served.state is not before and served.state.same_model()
        before = served.state
        quantized.norm.weight.mul_(2.0)  # a parameter changed in place: traced afresh
        assert not before.same_model()
        assert served_equals_python() and served_equals_python()

        twin = copy.deepcopy(quantized)
        assert traced_forward_of(twin) is not served and not traced_forward_of(twin).traces
        assert torch.equal(twin(**inputs)["out"], quantized(**inputs)["out"])
        assert traced_forward_of(twin).traces  # the copy traced its own


def test_signatures_beyond_the_limit_run_python(monkeypatch):
    torch.manual_seed(0)
    model = ShapeLoop().eval()
    calibration = _batches(2)
    quantized = fxq.quantize(model, calibration[0], mode="dynamic", calibration_data=calibration)
    monkeypatch.setattr(traced_serving, "MAX_TRACES", 2)
    served = traced_forward_of(quantized)
    with torch.no_grad():
        for length in (8, 16, 24, 32):
            inputs = _batches(1, length=length, seed=length)[0]
            assert torch.equal(quantized(**inputs)["out"], _python(quantized, **inputs)["out"])
    assert len(served.traces) == 2


def test_serve_traced_false_keeps_the_python_forward():
    model = ShapeLoop().eval()
    calibration = _batches(2)
    quantized = fxq.quantize(model, calibration[0], mode="dynamic", calibration_data=calibration, serve_traced=False)
    assert traced_forward_of(quantized) is None


@pytest.mark.parametrize("global_engine", ["onednn", "x86"])
def test_a_target_model_keeps_its_weights_packed_for_its_engine(global_engine):
    """Units swapped back to float for target_sqnr_db are put into a copy of the int8 model, and copying packs
    int8 weights for the current engine: the copy is made under the model's own, whatever the current one
    was (a trace of the model then matches its Python forward, and its saved file the measured outputs)."""
    from fxq.backend.engine import available_engines, using_engine

    if global_engine not in available_engines():
        pytest.skip(f"no {global_engine} engine on this CPU")
    torch.manual_seed(0)
    model = GeluLoop().eval()
    calibration = _batches(6)
    with using_engine(global_engine):
        quantized = fxq.quantize(model, calibration[0], calibration_data=calibration, target_sqnr_db=45)
    summary = fxq.summary_of(quantized)
    assert any("mixed precision" in why for _, why in summary.float_layers)
    with torch.no_grad(), using_engine(summary.engine):
        repacked = copy.deepcopy(quantized)  # every int8 weight packed afresh for the model's engine
        assert torch.equal(_python(repacked, **calibration[1])["out"], _python(quantized, **calibration[1])["out"])
