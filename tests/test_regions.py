"""Models whose own forward does not trace: every mode works on their traceable regions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxq
from fxq.backend.op_kinds import weighted_layers
from helpers import assert_state_unchanged, sqnr, state_snapshot


class Gate(nn.Module):
    """Branches on data: cannot be traced, so it stays a float leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if bool(x.mean() > -100) else x


class LoopOverLayers(nn.Module):
    """A top-level forward that reads plain attributes of its layers in a Python loop, as ultralytics'
    detection models do (`m.f` says which earlier output a layer reads), and branches on data."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(16, 4, 1)),
        ])
        for index, layer in enumerate(self.layers):
            layer.f = [-1, 0] if index == 2 else -1  # inputs: the previous output, or a list of them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for layer in self.layers:
            inputs = torch.cat([outputs[i] if i >= 0 else x for i in layer.f], 1) if isinstance(layer.f, list) else x
            x = layer(inputs)
            outputs.append(x)
        return x if bool(x.abs().sum() > 0) else -x


def _photos(seed: int, count: int = 4) -> list[torch.Tensor]:
    from fxq.samples import random_crops

    return list(random_crops(4 * count, seed=seed, size=32).split(4))


def test_static_regions_keep_the_attributes_the_models_own_loop_reads():
    torch.manual_seed(0)
    model = LoopOverLayers().eval()
    snapshot = state_snapshot(model)
    calibration, evaluation = _photos(1), _photos(2)
    quantized = fxq.quantize(model, calibration[0][:1], calibration_data=calibration)
    assert_state_unchanged(model, snapshot)
    assert quantized.layers[2].f == [-1, 0] and copy.deepcopy(quantized).layers[2].f == [-1, 0]
    layers = weighted_layers(quantized)
    assert len(layers.int8) >= 2
    reasons = dict(fxq.summary_of(quantized).float_layers)
    assert all(reasons.get(name) for name in layers.float), (layers.float, reasons)
    with torch.no_grad():
        assert sqnr(torch.cat([model(b) for b in evaluation]), torch.cat([quantized(b) for b in evaluation])) > 25.0


def test_keep_float_names_a_region():
    torch.manual_seed(0)
    model = LoopOverLayers().eval()
    calibration = _photos(1)
    quantized = fxq.quantize(model, calibration[0][:1], calibration_data=calibration, keep_float=["layers.1"])
    assert type(quantized.layers[1]) is nn.Sequential and type(quantized.layers[1][0]) is nn.Conv2d
    assert "layers.0.0" in weighted_layers(quantized).int8  # the other regions are still quantized
    float_layers = fxq.summary_of(quantized).float_layers
    assert "keep_float" in dict(float_layers)["layers.1.0"]
    assert len({name for name, _ in float_layers}) == len(float_layers)  # each float layer listed once


def test_qat_trains_and_converts_each_region_of_an_untraceable_model():
    torch.manual_seed(0)
    model = LoopOverLayers().eval()
    calibration, evaluation = _photos(1), _photos(2)
    prepared = fxq.prepare_qat(model, calibration[0][:1])
    optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-4)
    for batch in calibration:  # a few steps towards the float model's own outputs
        with torch.no_grad():
            target = model(batch)
        loss = (prepared(batch) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    quantized = fxq.convert(prepared)
    assert len(weighted_layers(quantized).int8) >= 2 and quantized.layers[2].f == [-1, 0]
    assert any("trained and converted separately" in note for note in fxq.summary_of(quantized).notes)
    prepared.eval()  # the trained fake-quantized model: what convert must reproduce in int8
    with torch.no_grad():  # measured 24.3 dB: fake quantization and the int8 kernels round differently
        assert sqnr(torch.cat([prepared(b) for b in evaluation]), torch.cat([quantized(b) for b in evaluation])) > 20.0


def test_inspect_lists_the_patterns_of_each_region():
    inspection = fxq.inspect(LoopOverLayers().eval(), torch.randn(1, 3, 16, 16))
    assert {p.pattern for p in inspection.patterns} >= {"conv-bn-relu"}
    assert any(node.startswith("layers.0.") for p in inspection.patterns for node in p.nodes)
    assert inspection.float_leaves[0].module == ""  # the top-level forward, with its reason
    assert inspection.layer_counts == {"Conv2d": 3}


class CastsToItsWeightType(nn.Module):
    """Casts its input to its first conv's weight dtype and device, as Hugging Face's ViTModel casts pixel
    values to `patch_embeddings.projection.weight.dtype`, then branches on data: the conv becomes a region of
    its own, and its int8 replacement holds no float `weight`."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype=self.proj.weight.dtype, device=self.proj.weight.device)
        y = self.head(self.proj(x))
        return y if bool(y.abs().sum() > 0) else -y


def _assert_weight_described(model: nn.Module, quantized: nn.Module, named: str = "proj: ") -> None:
    """The int8 part answers what the model's code reads of its float weight, and refuses its values with
    an error that starts with `named`."""
    for described in (quantized.proj.weight, copy.deepcopy(quantized).proj.weight):
        assert (described.dtype, described.device, described.shape) == \
               (model.proj.weight.dtype, model.proj.weight.device, model.proj.weight.shape)
    with pytest.raises(fxq.ReplacedTensorError, match=f"^{named}.*'.sum' of the module's float 'weight'"):
        quantized.proj.weight.sum()
    with pytest.raises(fxq.ReplacedTensorError, match=f"^{named}.*conv2d"):
        torch.nn.functional.conv2d(torch.zeros(1, 3, 4, 4), quantized.proj.weight)


def test_static_regions_keep_the_dtype_and_device_of_a_replaced_weight():
    torch.manual_seed(0)
    model = CastsToItsWeightType().eval()
    snapshot = state_snapshot(model)
    calibration, evaluation = _photos(1), _photos(2)
    quantized = fxq.quantize(model, calibration[0][:1], calibration_data=calibration)
    assert_state_unchanged(model, snapshot)
    layers = weighted_layers(quantized)
    assert layers.float == [] and {name.split(".")[0] for name in layers.int8} == {"proj", "head"}
    _assert_weight_described(model, quantized)
    with torch.no_grad():  # measured 33.4 dB
        assert sqnr(torch.cat([model(b) for b in evaluation]), torch.cat([quantized(b) for b in evaluation])) > 30.0


def test_qat_regions_keep_the_dtype_and_device_of_a_replaced_weight():
    torch.manual_seed(0)
    model = CastsToItsWeightType().eval()
    calibration, evaluation = _photos(1), _photos(2)
    prepared = fxq.prepare_qat(model, calibration[0][:1])
    with torch.no_grad():  # observers see the calibration batches; no training steps
        for batch in calibration:
            prepared(batch)
    quantized = fxq.convert(prepared)
    layers = weighted_layers(quantized)
    assert layers.float == [] and {name.split(".")[0] for name in layers.int8} == {"proj", "head"}
    _assert_weight_described(model, quantized)
    with torch.no_grad():  # measured 32.7 dB
        assert sqnr(torch.cat([model(b) for b in evaluation]), torch.cat([quantized(b) for b in evaluation])) > 29.5


class Upsampler(nn.Module):
    """A region with a transposed conv between two convs, behind a forward that branches on data (as
    YOLOv8n-seg's mask prototype module sits in its untraceable model)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 2, 2),
                                   nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        return x if bool(x.abs().sum() > 0) else -x


def test_a_transposed_conv_runs_float_between_int8_convs():
    """torch.ao refuses per-channel weight observers for transposed convs (its AssertionError escaped on
    YOLOv8n-seg); the transposed conv stays float and the convs around it are int8."""
    torch.manual_seed(0)
    model = Upsampler().eval()
    calibration, evaluation = _photos(1), _photos(2)
    quantized = fxq.quantize(model, calibration[0], calibration_data=calibration)
    assert any(isinstance(module, nn.ConvTranspose2d) for module in quantized.modules())
    layers = weighted_layers(quantized)
    assert len(layers.int8) == 2 and len(layers.float) == 1
    (listed,) = [why for name, why in fxq.summary_of(quantized).float_layers if name == layers.float[0]]
    assert listed.startswith("transposed conv")
    with torch.no_grad():
        assert sqnr(model(evaluation[0]), quantized(evaluation[0])) > 25
