"""Default static quantization of the real ImageNet MobileNetV2 on real photographic crops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxq
from helpers import sqnr

# Logits SQNR (dB) the default fxq.quantize must reach on the eval crops: 16.0 dB measured with 32 calibration
# and 64 eval crops (PyTorch's own FX default gives about 1 dB on the same model).
MOBILENET_SQNR_FLOOR_DB = 14.0

INT8_CONV_TYPES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")


@pytest.fixture(scope="module")
def quantized_mobilenet(mobilenet: nn.Module, calibration_crops: torch.Tensor) -> nn.Module:
    return fxq.quantize(mobilenet, calibration_crops[:1], calibration_data=list(calibration_crops.split(16)))


def test_default_quantize_reaches_sqnr_floor(mobilenet, quantized_mobilenet, eval_crops):
    with torch.no_grad():
        float_logits = mobilenet(eval_crops)
        int8_logits = quantized_mobilenet(eval_crops)
    assert int8_logits.shape == float_logits.shape == (64, 1000)
    logits_sqnr = sqnr(float_logits, int8_logits)
    print(f"MobileNetV2 default logits SQNR: {logits_sqnr:.2f} dB")
    assert math.isfinite(logits_sqnr)
    assert logits_sqnr > MOBILENET_SQNR_FLOOR_DB


def test_every_conv_runs_an_int8_kernel(mobilenet, quantized_mobilenet):
    float_convs = sum(isinstance(m, nn.Conv2d) for m in mobilenet.modules())
    assert float_convs == 52
    assert not [name for name, m in quantized_mobilenet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    int8_convs = [name for name, m in quantized_mobilenet.named_modules()
                  if "Conv" in type(m).__name__ and type(m).__module__.startswith(INT8_CONV_TYPES)]
    assert len(int8_convs) == float_convs
    summary = fxq.summary_of(quantized_mobilenet)
    assert summary is not None and summary.float_layers == []


def test_inspect_finds_conv_bn_relu6_chains(mobilenet, calibration_crops):
    inspection = fxq.inspect(mobilenet, calibration_crops[:1])
    clamp_chains = [p for p in inspection.patterns if p.pattern == "conv-bn-clamp"]
    assert len(clamp_chains) >= 30
    assert all(len(p.nodes) == 3 for p in clamp_chains)
    assert inspection.layer_counts == {"Conv2d": 52, "Linear": 1}
    assert inspection.float_leaves == []
