"""Drop-in coverage: torchvision models quantize with no edits, run, keep their output structure, and run
most of their conv/linear layers as int8 kernels.

Models come from bench/models.py (random weights, BatchNorm statistics re-estimated on real
photographs so activations have realistic ranges). Coverage is about tracing and kernels, so the
recovery passes are off (`STRUCTURE_OPTIONS`): they change numbers, not which kernels run, and cost time.
Inputs are the smallest each model takes comfortably (64x64; 75 for Inception-V3; 224 for the
transformers), with 2 calibration batches of 4 crops.

Per model, `EXPECTED` holds two numbers, both measured here (AMD EPYC, torch 2.14.1) and given margin:
- the int8 share of conv/linear calls. 1.0 unless fxq's cost model (fxq/frontend/islands.py) keeps
  layers float because int8 would be slower at this input size; the reason is asserted to be recorded;
- an SQNR floor (dB) of all outputs against float on 4 real crops: measured value minus ~3 dB. Random
  weights make deep networks' outputs sensitive, so these floors are low; they catch broken graphs (a
  lost op gives ~0 dB), not accuracy regressions (the MobileNetV2 checkpoint tests do that).

The default run takes five cheap models; `-m slow` runs the rest, detection included.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import fxq
from bench.models import MODELS, build, crops
from fxq.backend.op_kinds import weighted_layers
from fxq.calibration import output_tensors
from helpers import sqnr

STRUCTURE_OPTIONS = dict(optimize_rounding=False, equalize=False, bias_correction=False)
CALIBRATION_BATCHES, BATCH = 2, 4

# name: (minimum int8 share of conv/linear calls, SQNR floor dB), measured at the test input size with
# the options above; the measured SQNR follows each line. Shares below 1.0 are float islands (see why).
EXPECTED: dict[str, tuple[float, float]] = {
    "resnet18": (1.0, 18.0),  # 22.8
    "resnet50": (1.0, 9.0),  # 12.4
    "resnext50_32x4d": (1.0, 8.0),  # 11.3
    "wide_resnet50_2": (1.0, 8.0),  # 11.1
    "mobilenet_v2": (1.0, 6.0),  # 9.2
    "mobilenet_v3_small": (1.0, 0.0),  # 3.1: random MobileNetV3s amplify any perturbation (chaotic regime)
    "mobilenet_v3_large": (1.0, 3.0),  # 6.2
    # 9 of 57 float: the 116-channel depthwise convs of stage 3, which x86 runs in a reference loop
    "shufflenet_v2_x1_0": (0.8, 4.0),  # 7.1
    "squeezenet1_1": (1.0, 30.0),  # 36.0
    "mnasnet1_0": (1.0, 5.0),  # 7.8
    "googlenet": (1.0, 12.0),  # 16.0
    "inception_v3": (1.0, 4.0),  # 7.0
    "densenet121": (1.0, 16.0),  # 20.0
    "efficientnet_b0": (1.0, 2.0),  # 5.2
    "efficientnet_v2_s": (1.0, 0.5),  # 3.2, chaotic like the MobileNetV3s
    "regnet_x_400mf": (1.0, 10.0),  # 13.8
    "regnet_y_400mf": (1.0, 7.0),  # 10.0
    "convnext_tiny": (1.0, 25.0),  # 29.8
    "vgg11_bn": (1.0, 20.0),  # 24.4
    "alexnet": (1.0, 37.0),  # 42.3
    "vit_b_16": (1.0, 12.0),  # 15.2
    "swin_t": (1.0, 26.0),  # 30.2
    "maxvit_t": (0.95, 16.0),  # 19.6; 3 of 151 float: squeeze-excitation convs on 1x1 maps
    "fcn_resnet50": (1.0, 5.0),  # 8.6
    # 3 of 70 float: dilated depthwise convs with more than 100 channels (x86 reference loop)
    "deeplabv3_mobilenet_v3_large": (0.9, 5.0),  # 8.1
    "lraspp_mobilenet_v3_large": (0.9, 4.0),  # 7.1
}
FAST = {"resnet18", "mobilenet_v3_small", "shufflenet_v2_x1_0", "squeezenet1_1", "lraspp_mobilenet_v3_large"}


def _structure(value: Any) -> Any:
    """Container types, mapping keys and tensor shapes of a model output."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape))
    if isinstance(value, dict):
        return (type(value).__name__, [(key, _structure(item)) for key, item in value.items()])
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, [_structure(item) for item in value])
    return type(value).__name__


def _params() -> list[Any]:
    return [pytest.param(name, marks=() if name in FAST else pytest.mark.slow) for name in EXPECTED]


@pytest.mark.parametrize("name", _params())
def test_model_quantizes_runs_and_keeps_its_outputs(name: str):
    spec = MODELS[name]
    model = build(name)
    calibration = crops(spec, CALIBRATION_BATCHES * BATCH, seed=1)
    evaluation = crops(spec, 4, seed=2)
    quantized = fxq.quantize(model, calibration[:1], calibration_data=list(calibration.split(BATCH)),
                             **STRUCTURE_OPTIONS)
    with torch.no_grad():
        expected, actual = model(evaluation), quantized(evaluation)
    assert _structure(actual) == _structure(expected)
    expected_tensors, actual_tensors = output_tensors(expected), output_tensors(actual)
    assert all(torch.isfinite(t).all() for t in actual_tensors)
    measured = sqnr(torch.cat([t.reshape(-1) for t in expected_tensors]),
                    torch.cat([t.reshape(-1) for t in actual_tensors]))
    layers = weighted_layers(quantized)
    conv_linear = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    print(f"{name}: int8 {len(layers.int8)}/{len(layers.int8) + len(layers.float)} "
          f"({layers.int8_fraction:.3f}), SQNR {measured:.2f} dB")
    min_fraction, floor_db = EXPECTED[name]
    assert len(layers.int8) + len(layers.float) >= conv_linear  # every layer accounted for (calls >= modules)
    assert layers.int8_fraction >= min_fraction
    assert measured > floor_db
    summary = fxq.summary_of(quantized)
    for layer in layers.float:  # every float layer is listed with the cost model's reason
        reason = next((why for listed, why in summary.float_layers
                       if layer == listed or layer.startswith(listed + ".")), None)
        assert reason is not None and reason.startswith("float island: int8 would cost"), (layer, reason)


DETECTORS = ["fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn", "ssdlite320_mobilenet_v3_large"]


@pytest.mark.slow
@pytest.mark.parametrize("name", DETECTORS)
def test_detector_backbone_is_int8_and_heads_stay_float(name: str):
    """The detector's own forward does not trace: its traceable parts are quantized as regions, the rest
    runs as the model's Python code in float, and the summary says so."""
    spec = MODELS[name]
    model = build(name)
    images = crops(spec, 5, seed=1)
    quantized = fxq.quantize(model, ([images[0]],), calibration_data=[([image],) for image in images[1:4]],
                             **STRUCTURE_OPTIONS)
    summary = fxq.summary_of(quantized)
    assert summary.notes and "does not trace" in summary.notes[0]
    assert "backbone" in summary.notes[0].split("quantized separately:")[1]
    layers = weighted_layers(quantized)
    backbone = [n for n in layers.int8 if n.startswith("backbone")]
    assert backbone and not [n for n in layers.float if n.startswith("backbone")]
    with torch.no_grad():
        expected, actual = model([images[4]]), quantized([images[4]])
        features = model.transform([images[4]])[0].tensors
        float_features = output_tensors(model.backbone(features))
        int8_features = output_tensors(quantized.backbone(features))
    assert [sorted(d) for d in actual] == [sorted(d) for d in expected]
    measured = sqnr(torch.cat([t.reshape(-1) for t in float_features]),
                    torch.cat([t.reshape(-1) for t in int8_features]))
    print(f"{name}: {len(layers.int8)} int8, {len(layers.float)} float; backbone SQNR {measured:.2f} dB")
    assert math.isfinite(measured) and measured > DETECTOR_BACKBONE_FLOOR_DB[name]


# measured 3.0, 6.3 and 4.9 dB on the backbone's feature maps
DETECTOR_BACKBONE_FLOOR_DB = {"fasterrcnn_mobilenet_v3_large_fpn": 0.0, "retinanet_resnet50_fpn": 3.0,
                              "ssdlite320_mobilenet_v3_large": 2.0}


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot branch on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(32, 32, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.conv(x)
        return x


class Checked(nn.Module):
    """A shape assert: the tracer's symbolic shape cannot be compared to a number."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(32, 32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 32, "expects 32 channels"
        return self.conv(x)


class Untraceable(nn.Module):
    """Traceable convs around two blocks that are not, plus a SiLU (no int8 kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.gate = Gate()
        self.body = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.SiLU())
        self.checked = Checked()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.checked(self.body(self.gate(self.stem(x)))))


def test_untraceable_blocks_stay_float_and_the_report_says_why():
    """The smallest blocks that do not trace run as Python in float; the convs inside them are traceable
    on their own, so they are quantized separately, calibrated on what they receive in the float model."""
    torch.manual_seed(0)
    model = Untraceable().eval()
    photos = crops(MODELS["resnet18"], 8, seed=4, size=32)
    quantized = fxq.quantize(model, photos[:1], calibration_data=list(photos.split(4)), **STRUCTURE_OPTIONS)
    summary = fxq.summary_of(quantized)
    assert summary.float_layers == []
    # a conv quantized on its own traces to F.conv2d on its own weight, which canonicalization makes a module
    assert weighted_layers(quantized).int8 == ["stem.0", "body.0", "head.2", "gate.conv.conv",
                                                      "checked.conv.conv"]
    untraceable = {what: why for what, why in summary.float_ops if why.startswith("untraceable")}
    assert untraceable == {
        "gate: runs as Python in float; int8 inside: gate.conv":
            "untraceable: TraceError: symbolically traced variables cannot be used as inputs to control flow",
        "checked: runs as Python in float; int8 inside: checked.conv":
            "untraceable: TraceError: symbolically traced variables cannot be used as inputs to control flow"}
    assert [what for what, why in summary.float_ops if why.startswith("no int8 kernel")] == ["SiLU: body.1"]
    text = str(fxq.report(model, quantized, photos[:1], eval_data=[photos]))
    assert "what falls back to float" in text and "gate: runs as Python" in text and "SiLU: body.1" in text
    with torch.no_grad():
        assert sqnr(model(photos), quantized(photos)) > 35  # measured 42.6 dB


class TinyEncoder(nn.Module):
    """Self-attention through nn.MultiheadAttention (a torch.fx leaf) and a masked one that must stay."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(48, 64)
        self.attention = nn.MultiheadAttention(64, 4, batch_first=batch_first)
        self.masked = nn.MultiheadAttention(64, 4, batch_first=batch_first)
        self.head = nn.Linear(64, 10)
        self.register_buffer("causal", torch.triu(torch.ones(16, 16, dtype=torch.bool), 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens if self.batch_first else tokens.transpose(0, 1))
        x = x + self.attention(x, x, x, need_weights=False)[0]
        x = x + self.masked(x, x, x, attn_mask=self.causal, need_weights=False)[0]
        return self.head(x if self.batch_first else x.transpose(0, 1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_projections_become_int8(batch_first):
    torch.manual_seed(0)
    model = TinyEncoder(batch_first).eval()
    photos = crops(MODELS["resnet18"], 8, seed=3, size=16)
    tokens = photos.reshape(8, 3, 16, 16).permute(0, 2, 3, 1).reshape(8, 16, 48)  # 16 tokens of 48 values
    quantized = fxq.quantize(model, tokens[:1], calibration_data=list(tokens.split(4)), **STRUCTURE_OPTIONS)
    summary = fxq.summary_of(quantized)
    assert "decompose: attention (MultiheadAttention -> in_proj/out_proj Linear)" in summary.rewrites
    layers = weighted_layers(quantized)
    assert layers.int8 == ["embed", "attention.in_proj", "attention.out_proj", "head"]
    assert layers.float == ["masked.out_proj"]  # a masked attention stays nn.MultiheadAttention
    with torch.no_grad():
        measured = sqnr(model(tokens), quantized(tokens))
    print(f"batch_first={batch_first}: SQNR {measured:.2f} dB")
    assert measured > 25  # measured 32.1 dB


def test_default_options_on_token_inputs():
    torch.manual_seed(0)
    model = TinyEncoder(batch_first=True).eval()
    tokens = torch.randn(8, 16, 48)
    fxq.quantize(model, tokens[:1], calibration_data=list(tokens.split(4)), optimize_rounding=False)
