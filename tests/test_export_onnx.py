"""fxq.export_onnx: fxq's int8 models as ONNX QDQ files, run in ONNX Runtime (and OpenVINO) against the torch
int8 model they come from.

Each exported model must pass onnx.checker, run at any batch size, match fxq's torch int8 model above a
measured SQNR floor, be as close to float as the torch int8 model is (within 0.5 dB), and run int8 kernels in
the runtime (QLinearConv in ONNX Runtime's optimized graph, u8 convolutions in OpenVINO's). Where two int8
implementations round a few values differently, a deep model amplifies the difference: on MobileNetV2 fxq's
own torch model, fed inputs moved by 1e-6, differs from itself at 22.5 dB (docs/design/onnx-export.md), so
the floors against the torch int8 model are far below what one layer would give.
"""

from __future__ import annotations

import math

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq.backend.engine import using_engine
from fxq.export import ExportError, export_onnx
from fxq.samples import random_crops
from helpers import sqnr

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from bench.onnx_runtimes import ort_optimized_ops, ort_runner, ort_session  # noqa: E402 (needs onnxruntime)

# How much closer to float the torch int8 model may be than its export (the goal).
FLOAT_SQNR_TOLERANCE_DB = 0.5


class Residual(nn.Module):
    """conv-bn-relu, a conv whose output a residual add reads (onednn's fused conv + add), conv + ReLU then
    an int8 add, pooling, flatten, linear + ReLU and a linear head (fxq's dynamic int8 head)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.pointwise = nn.Conv2d(16, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(16, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.conv(x) + x
        x = torch.relu(self.pointwise(x)) + x
        return self.head(torch.relu(self.hidden(torch.flatten(self.pool(x), 1))))


class Mixer(nn.Module):
    """Ops around the int8 layers: hardswish, max pooling, cat, nearest upsampling, a sigmoid gate, tokens
    with layer norm and a linear layer on a 3-D tensor, a mean."""

    def __init__(self, leaf: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardswish())
        self.pool = nn.MaxPool2d(2)
        self.left, self.right = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 3, padding=1)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 16, 1), nn.Sigmoid())
        self.leaf = leaf or nn.Identity()
        self.norm, self.mix, self.head = nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        x = torch.cat([self.left(x), self.right(x)], 1)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.leaf(x * self.gate(x))
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.mix(self.norm(tokens))
        return self.head(tokens.mean(1))


class Gate(nn.Module):
    """Python control flow on a tensor's value: fxq keeps it as a float leaf, a trace would freeze the branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return x * 2
        return x


PLANTED = {"residual": Residual, "mixer": Mixer}
# ONNX Runtime against fxq's torch int8 model on 16 crops, measured (Intel Xeon, AVX-512 VNNI): residual
# 49.1 dB, mixer 45.5 dB (33.6 while torch's dynamic head took 7-bit inputs); floors a few dB below.
PLANTED_FLOOR_DB = {"residual": 45.0, "mixer": 40.0}


def _quantize(model: nn.Module, size: int, count: int = 32, **options) -> nn.Module:
    crops = random_crops(count, seed=1, size=size)
    return fxq.quantize(model.eval(), crops[:1], calibration_data=list(crops.split(16)), **options)


def _onnx_outputs(path, inputs: torch.Tensor) -> torch.Tensor:
    run = ort_runner(ort_session(path))
    return torch.cat([torch.from_numpy(run(batch.numpy().copy())) for batch in inputs.split(16)])


def _torch_outputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(batch) for batch in inputs.split(16)])


@pytest.fixture(scope="module", params=sorted(PLANTED))
def planted(request) -> tuple[str, nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = PLANTED[request.param]().eval()
    return request.param, model, _quantize(model, 32)


def test_planted_export_matches_the_int8_model(planted, tmp_path):
    name, model, int8_model = planted
    crops = random_crops(16, seed=2, size=32)
    path = export_onnx(int8_model, tmp_path / f"{name}.onnx", crops[:1])
    onnx.checker.check_model(onnx.load(path), full_check=True)
    exported, int8, reference = _onnx_outputs(path, crops), _torch_outputs(int8_model, crops), \
        _torch_outputs(model, crops)
    print(f"{name}: ONNX Runtime vs torch int8 {sqnr(int8, exported):.1f} dB; vs float {sqnr(reference, exported):.1f}"
          f" dB (torch int8 {sqnr(reference, int8):.1f} dB)")
    assert sqnr(int8, exported) > PLANTED_FLOOR_DB[name]
    # the export's own difference adds to the int8 model's error as independent noise, nothing more
    independent = -10 * math.log10(10 ** (-sqnr(reference, int8) / 10) + 10 ** (-sqnr(int8, exported) / 10))
    assert sqnr(reference, exported) > min(independent - 0.2, sqnr(reference, int8) - FLOAT_SQNR_TOLERANCE_DB)


def test_the_batch_dimension_is_dynamic(planted, tmp_path):
    name, _, int8_model = planted
    crops = random_crops(16, seed=2, size=32)
    path = export_onnx(int8_model, tmp_path / f"{name}.onnx", crops[:1])
    run = ort_runner(ort_session(path))
    one_at_a_time = torch.cat([torch.from_numpy(run(crop[None].numpy())) for crop in crops])
    assert torch.from_numpy(run(crops.numpy())).shape == one_at_a_time.shape
    assert sqnr(_torch_outputs(int8_model, crops), one_at_a_time) > PLANTED_FLOOR_DB[name] - 5


def _int8_conv_modules(int8_model: nn.Module) -> list[str]:
    return [name for name, module in int8_model.named_modules()
            if "Conv" in type(module).__name__ and type(module).__module__.startswith("torch.ao.nn")]


def _conv_add_modules(int8_model: nn.Module) -> list[str]:
    return [name for name, module in int8_model.named_modules() if type(module).__name__.startswith("ConvAdd")]


@pytest.fixture(scope="module")
def residual_int8() -> nn.Module:
    torch.manual_seed(0)
    int8_model = _quantize(Residual(), 32)
    assert _conv_add_modules(int8_model), "the planted residual conv is meant to fuse with its add (onednn)"
    return int8_model


def test_onnx_runtime_runs_the_layers_in_int8(residual_int8, tmp_path):
    """conv_add='fused' keeps the fused conv + add exact, which ONNX Runtime runs as a float conv; 'requantize'
    makes every conv a QLinearConv and the add a QLinearAdd. The dynamic head is DynamicQuantizeMatMul."""
    crops = random_crops(32, seed=1, size=32)
    convs, fused = len(_int8_conv_modules(residual_int8)), len(_conv_add_modules(residual_int8))
    ops = ort_optimized_ops(export_onnx(residual_int8, tmp_path / "fused.onnx", crops[:1]))
    assert ops["QLinearConv"] == convs - fused and ops["FusedConv"] + ops["Conv"] == fused
    assert ops["QLinearAdd"] == 1 and ops["QGemm"] == 1 and ops["DynamicQuantizeMatMul"] == 1
    path = export_onnx(residual_int8, tmp_path / "requantize.onnx", crops[:1], conv_add="requantize",
                       calibration_data=list(crops.split(16)))
    ops = ort_optimized_ops(path)
    assert ops["QLinearConv"] == convs and ops["QLinearAdd"] == 1 + fused and not ops["FusedConv"] + ops["Conv"]


def _kept_fused(path) -> list[str]:
    """The conv + add units an export with conv_add='auto' kept fused, from its metadata."""
    written = {prop.key: prop.value for prop in onnx.load(path).metadata_props}["fxq.conv_add"]
    return written.split("; kept fused: ")[1].split(", ") if "; kept fused: " in written else []


def test_auto_keeps_the_last_unit_fused_only_where_onnx_runtime_shows_it_pays(residual_int8, tmp_path):
    """conv_add='auto' requantizes, and keeps the last unit fused where ONNX Runtime's outputs on the
    calibration batches come AUTO_MIN_GAIN_DB closer to the torch model's for it."""
    from fxq.export.conv_add import AUTO_MIN_GAIN_DB

    crops = random_crops(32, seed=1, size=32)
    batches = list(crops.split(16))
    auto = export_onnx(residual_int8, tmp_path / "auto.onnx", crops[:1], conv_add="auto", calibration_data=batches)
    requantized = export_onnx(residual_int8, tmp_path / "requantize.onnx", crops[:1], conv_add="requantize",
                              calibration_data=batches)
    fused = export_onnx(residual_int8, tmp_path / "fused.onnx", crops[:1])
    expected = _torch_outputs(residual_int8, crops)
    gain = sqnr(expected, _onnx_outputs(fused, crops)) - sqnr(expected, _onnx_outputs(requantized, crops))
    kept = _kept_fused(auto)
    assert kept == (_conv_add_modules(residual_int8)[-1:] if gain >= AUTO_MIN_GAIN_DB else [])
    ops = ort_optimized_ops(auto)
    assert ops["FusedConv"] + ops["Conv"] == len(kept)
    assert ops["QLinearConv"] == len(_int8_conv_modules(residual_int8)) - len(kept)


def test_the_dynamic_head_can_be_written_as_a_float_matmul(residual_int8, tmp_path):
    crops = random_crops(16, seed=2, size=32)
    path = export_onnx(residual_int8, tmp_path / "float_head.onnx", crops[:1], dynamic_linear="float")
    assert "DynamicQuantizeMatMul" not in ort_optimized_ops(path)
    assert sqnr(_torch_outputs(residual_int8, crops), _onnx_outputs(path, crops)) > PLANTED_FLOOR_DB["residual"]


def test_options_are_checked(residual_int8, tmp_path):
    crops = random_crops(16, seed=1, size=32)
    with pytest.raises(fxq.InputError, match="conv_add='fast' is not valid"):
        export_onnx(residual_int8, tmp_path / "m.onnx", crops[:1], conv_add="fast")
    with pytest.raises(fxq.InputError, match="pass calibration_data"):
        export_onnx(residual_int8, tmp_path / "m.onnx", crops[:1], conv_add="requantize")
    with pytest.raises(fxq.InputError, match="only with conv_add='requantize' or 'auto'"):
        export_onnx(residual_int8, tmp_path / "m.onnx", crops[:1], calibration_data=[crops])


def test_an_untraceable_float_leaf_is_named(tmp_path):
    """A leaf whose Python branches on a tensor's value cannot be traced without freezing the branch."""
    torch.manual_seed(0)
    int8_model = _quantize(Mixer(Gate()), 32)
    with pytest.raises(ExportError, match=r"^leaf \(Gate\): runs Python code a trace cannot follow"):
        export_onnx(int8_model, tmp_path / "gate.onnx", random_crops(1, seed=2, size=32))
    assert not (tmp_path / "gate.onnx").exists()


def test_an_int8_module_without_an_onnx_form_is_named(residual_int8, tmp_path):
    """An int8 module the exporter has no QDQ unit for (an int8 transposed conv, swapped in) is named."""
    import torch.ao.nn.quantized as nnq

    int8_model = torch.fx.GraphModule(residual_int8, residual_int8.graph)  # a new module tree; weights shared
    int8_model.pointwise = nnq.ConvTranspose2d(16, 16, 1)
    with using_engine(fxq.summary_of(residual_int8).engine), \
            pytest.raises(ExportError, match=r"^pointwise: int8 module ConvTranspose2d .* has no ONNX QDQ form"):
        export_onnx(int8_model, tmp_path / "m.onnx", random_crops(1, seed=2, size=32))


def test_a_model_that_is_not_a_graph_module_is_refused(tmp_path):
    with pytest.raises(ExportError, match="needs the fx.GraphModule"):
        export_onnx(Residual().eval(), tmp_path / "m.onnx", random_crops(1, seed=2, size=32))


# --- the real MobileNetV2 ---------------------------------------------------------------------------------

# MobileNetV2 (32 calibration crops, optimize_rounding and bias_correction off to keep this test near 60 s:
# the torch int8 model is then 13.7 dB from float), 64 eval crops, the export against the torch int8 model,
# measured (Intel Xeon, AVX-512 VNNI): ONNX Runtime 22.6 dB (conv_add='fused'), 21.8 dB ('requantize');
# OpenVINO 22.4 dB. Against float all are within 0.2 dB of the torch int8 model.
MOBILENET_FLOOR_DB = 19.0


@pytest.fixture(scope="module")
def mobilenet_int8(mobilenet, calibration_crops) -> nn.Module:
    return fxq.quantize(mobilenet, calibration_crops[:1], calibration_data=list(calibration_crops.split(16)),
                        optimize_rounding=False, bias_correction=False)


@pytest.mark.parametrize("conv_add", ["fused", "requantize", "auto"])
def test_mobilenet_v2_runs_int8_in_onnx_runtime(mobilenet, mobilenet_int8, calibration_crops, eval_crops, conv_add,
                                                tmp_path):
    calibration = {"calibration_data": list(calibration_crops.split(16))} if conv_add != "fused" else {}
    path = export_onnx(mobilenet_int8, tmp_path / "mobilenet_v2.onnx", eval_crops[:1], conv_add=conv_add,
                       **calibration)
    exported, int8 = _onnx_outputs(path, eval_crops), _torch_outputs(mobilenet_int8, eval_crops)
    reference = _torch_outputs(mobilenet, eval_crops)
    print(f"MobileNetV2, conv_add={conv_add!r}: ONNX Runtime vs torch int8 {sqnr(int8, exported):.2f} dB, vs float "
          f"{sqnr(reference, exported):.2f} dB (torch int8 {sqnr(reference, int8):.2f} dB)")
    assert sqnr(int8, exported) > MOBILENET_FLOOR_DB
    assert sqnr(reference, exported) > sqnr(reference, int8) - FLOAT_SQNR_TOLERANCE_DB
    ops = ort_optimized_ops(path)
    fused = len(_conv_add_modules(mobilenet_int8))
    assert fused == 10
    if conv_add == "fused":
        float_convs = fused
    else:  # 'auto' keeps at most the last two units fused
        float_convs = len(_kept_fused(path))
        assert float_convs <= (2 if conv_add == "auto" else 0)
    assert ops["QLinearConv"] == 52 - float_convs
    assert ops["QLinearAdd"] == fused - float_convs


def test_mobilenet_v2_runs_int8_in_openvino(mobilenet, mobilenet_int8, eval_crops, tmp_path):
    pytest.importorskip("openvino")
    from bench.onnx_runtimes import ov_compile, ov_int8_convs, ov_runner

    compiled = ov_compile(export_onnx(mobilenet_int8, tmp_path / "mobilenet_v2.onnx", eval_crops[:1]))
    run = ov_runner(compiled)
    exported = torch.cat([torch.from_numpy(run(batch.numpy().copy())) for batch in eval_crops.split(16)])
    int8, reference = _torch_outputs(mobilenet_int8, eval_crops), _torch_outputs(mobilenet, eval_crops)
    print(f"MobileNetV2 in OpenVINO: vs torch int8 {sqnr(int8, exported):.2f} dB, vs float "
          f"{sqnr(reference, exported):.2f} dB (torch int8 {sqnr(reference, int8):.2f} dB)")
    assert sqnr(int8, exported) > MOBILENET_FLOOR_DB
    assert sqnr(reference, exported) > sqnr(reference, int8) - FLOAT_SQNR_TOLERANCE_DB
    assert ov_int8_convs(compiled) == "52/52"


# --- third-party models: a timm transformer and a timm ConvNeXt ------------------------------------------

# timm models at a small input size, random weights with BatchNorm statistics re-estimated on photographs
# (bench/models.py); ONNX Runtime against fxq's torch int8 model, measured: vit 21.3 dB, convnext 35.2 dB.
TIMM = {"vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 2}, 32, 18.0),
        "convnext_nano": ({}, 64, 30.0)}


@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_models_export(name, tmp_path):
    timm = pytest.importorskip("timm")
    from bench.models import recalibrate_batchnorm

    kwargs, size, floor = TIMM[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    recalibrate_batchnorm(model, random_crops(16, seed=7, size=size))
    int8_model = _quantize(model.eval(), size, count=16, optimize_rounding=False, bias_correction=False)
    crops = random_crops(16, seed=2, size=size)
    path = export_onnx(int8_model, tmp_path / f"{name}.onnx", crops[:1])
    exported, int8, reference = _onnx_outputs(path, crops), _torch_outputs(int8_model, crops), \
        _torch_outputs(model, crops)
    print(f"{name}: ONNX Runtime vs torch int8 {sqnr(int8, exported):.1f} dB; vs float {sqnr(reference, exported):.1f}"
          f" dB (torch int8 {sqnr(reference, int8):.1f} dB); {dict(collections.Counter(ort_optimized_ops(path)))}")
    assert sqnr(int8, exported) > floor
    assert sqnr(reference, exported) > sqnr(reference, int8) - FLOAT_SQNR_TOLERANCE_DB
