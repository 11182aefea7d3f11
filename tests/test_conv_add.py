"""Residual adds fused into the conv that feeds them (onednn's conv2d_add): one rounding less per block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxq
from helpers import photo_batches, small_mobilenet, sqnr

pytestmark = pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines,
                                reason="conv2d_add is an onednn kernel")

FAST = dict(optimize_rounding=False)


def _quantized_adds(quantized: torch.fx.GraphModule) -> int:
    return sum(node.op == "call_function" and node.target in (torch.ops.quantized.add, torch.ops.quantized.add_relu)
               for node in quantized.graph.nodes)


@pytest.fixture(scope="module")
def blocks(mobilenet):
    """MobileNetV2's stem and first four blocks: features.3 is the one with a skip."""
    return small_mobilenet(mobilenet)


@pytest.fixture(scope="module")
def fused(blocks):
    batches, _ = photo_batches()
    return fxq.quantize(blocks, batches[0][:1], calibration_data=batches, **FAST)


def test_projection_conv_and_residual_add_run_as_one_int8_kernel(fused):
    summary = fxq.summary_of(fused)
    assert summary.engine == "onednn"
    assert [p for p in summary.patterns if p.startswith("conv-add")] == ["conv-add (one int8 kernel): 3.conv.2 + add"]
    assert type(fused.get_submodule("3.conv.2")).__name__ == "ConvAdd2d"
    assert _quantized_adds(fused) == 0


def test_fused_kernel_computes_what_the_corrected_simulation_does(fused):
    """The recovery passes corrected a simulation without the conv's output rounding: onednn's int8
    output must match it, and x86 (which cannot fuse, so rounds there) must match it less well."""
    fidelity = fxq.summary_of(fused).engine_fidelity_db
    assert set(fidelity) == {"onednn", "x86"}
    assert fidelity["onednn"] > 35.0, fidelity
    assert fidelity["onednn"] > fidelity["x86"], fidelity


def test_fused_model_is_accurate_and_survives_save_and_load(blocks, fused, tmp_path):
    _, evaluation = photo_batches()
    loaded = fxq.load(fxq.save(fused, tmp_path / "fused.pt"))
    with torch.no_grad():
        reference, int8 = blocks(evaluation), fused(evaluation)
        assert torch.equal(int8, loaded(evaluation))
    assert sqnr(reference, int8) > 18.0  # 21.5 dB measured (16 calibration crops of 64x64)


def test_sensitivity_compares_a_fused_layer_with_the_float_add(blocks):
    """The fused layer's output is conv + residual: its accumulated and own errors are measured
    against the float add's output (against the conv's output alone they would be near 0 dB).
    Measured: accumulated 18.6 dB, own 34.2 dB, solo 45.5 dB."""
    batches, evaluation = photo_batches()
    report = fxq.sensitivity(blocks, batches[0][:1], calibration_data=batches, eval_data=[evaluation], **FAST)
    row = report["3.conv.2"]
    assert row.op == "ConvAdd2d"
    assert row.sqnr_db > 15.0 and row.own_sqnr_db > 28.0 and row.solo_sqnr_db > 35.0, row


class BroadcastAdd(nn.Module):
    """A conv whose output is added to a per-channel mean: shapes differ, so conv2d_add cannot take it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x).relu()
        return self.head(self.conv(x) + x.mean((2, 3), keepdim=True))


def test_add_that_broadcasts_is_not_fused():
    torch.manual_seed(0)
    model = BroadcastAdd().eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    quantized = fxq.quantize(model, batches[0][:1], calibration_data=batches, **FAST)
    assert not [p for p in fxq.summary_of(quantized).patterns if p.startswith("conv-add")]
    assert type(quantized.get_submodule("conv")).__name__ == "Conv2d"
    with torch.no_grad():
        assert sqnr(model(batches[0]), quantized(batches[0])) > 25.0


class ReadAfterAdd(nn.Module):
    """The skip tensor `y` is read again after the first residual add: onednn's kernel writes its output
    over the residual it adds, so only the second add (y's last reader) may be fused."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.stem(x).relu()
        z = self.conv(y) + y
        return self.head(z) + y


def test_residual_read_after_the_add_is_not_overwritten():
    torch.manual_seed(0)
    model = ReadAfterAdd().eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    quantized = fxq.quantize(model, batches[0][:1], calibration_data=batches, **FAST)
    assert [p for p in fxq.summary_of(quantized).patterns if p.startswith("conv-add")] == \
        ["conv-add (one int8 kernel): head + add"]
    with torch.no_grad():
        assert sqnr(model(batches[0]), quantized(batches[0])) > 25.0


class Downsample(nn.Module):
    """A ResNet basic block with a downsample: add + ReLU after two convs, the later one is fused."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.downsample = nn.Conv2d(8, 16, 1, stride=2)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(self.conv2(self.conv1(x)) + self.downsample(x)))


def test_sensitivity_of_a_fused_add_relu_reads_the_residual_grid_before_the_kernel_overwrites_it():
    """Measured before the pre-hook: own 12 dB, solo 19 dB for ResNet-18's fused downsample convs (the
    residual's grid was read after the call, when it held the output's); with it, 35 and 43 dB."""
    torch.manual_seed(0)
    model = Downsample().eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    report = fxq.sensitivity(model, batches[0][:1], calibration_data=batches, **FAST)
    row = report["downsample"]
    assert row.op == "ConvAddReLU2d"
    assert row.own_sqnr_db > 30.0 and row.solo_sqnr_db > 30.0, row


@pytest.mark.parametrize("options", [{}, {"target_sqnr_db": 40.0}], ids=["default", "mixed precision"])
def test_quantize_leaves_the_global_engine_on_the_models_own(blocks, options):
    """conv2d_add runs only under the onednn engine; PyTorch's default on x86 is x86. Every way of building
    the model (the mixed-precision search returns from inside quantize) must leave the engine set to it."""
    if "x86" not in torch.backends.quantized.supported_engines:
        pytest.skip("needs a second engine to start from")
    batches, evaluation = photo_batches()
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    try:
        quantized = fxq.quantize(blocks, batches[0][:1], calibration_data=batches, **FAST, **options)
        assert torch.backends.quantized.engine == fxq.summary_of(quantized).engine == "onednn"
        with torch.no_grad():
            assert sqnr(blocks(evaluation), quantized(evaluation)) > 18.0
    finally:
        torch.backends.quantized.engine = previous


def test_a_model_without_a_conv_feeding_a_residual_add_runs_on_x86(blocks):
    """onednn is preferred for its conv+add kernel; the stem and first two blocks hold no such pair, so
    auto takes x86 (faster int8 linear layers) and says why, and x86 stays as faithful as onednn."""
    if "x86" not in torch.backends.quantized.supported_engines:
        pytest.skip("needs the x86 engine")
    batches, evaluation = photo_batches()
    no_skip = blocks[:3]  # features.0 to features.2: no residual add
    quantized = fxq.quantize(no_skip, batches[0][:1], calibration_data=batches, **FAST)
    summary = fxq.summary_of(quantized)
    assert summary.engine == "x86" and "no conv feeds a residual add" in summary.engine_reason
    assert not [p for p in summary.patterns if p.startswith("conv-add")]
    assert list(summary.engine_fidelity_db) == ["x86", "onednn"]
    assert summary.engine_fidelity_db["x86"] >= summary.engine_fidelity_db["onednn"] - 1.0
    forced = fxq.quantize(no_skip, batches[0][:1], calibration_data=batches, backend="onednn", **FAST)
    assert fxq.summary_of(forced).engine == "onednn"  # a named backend is never replaced
    with torch.no_grad():
        reference = no_skip(evaluation)
        on_x86, on_onednn = sqnr(reference, quantized(evaluation)), sqnr(reference, forced(evaluation))
    assert on_x86 > 17.0 and on_x86 > on_onednn - 0.5, (on_x86, on_onednn)  # 19.3 dB measured (VNNI)
