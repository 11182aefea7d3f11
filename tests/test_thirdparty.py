"""Third-party models (issue 27) quantize as drop-ins: timm, efficientnet_pytorch, ultralytics and transformers.

Models come from bench/thirdparty.py (random weights, zero-initialized weights re-drawn, BatchNorm statistics
re-estimated on photographs). The default suite runs one small model per pattern of the issue:
efficientnet_pytorch's Conv2dStaticSamePadding (ZeroPad2d + F.conv2d in a conv subclass) and its
Conv2dDynamicSamePadding inside blocks with an optional argument, timm's Conv2dSame + BatchNormAct2d
(tf_efficientnet_b0), ultralytics' YOLOv8n whose forward loops over its layers, a Hugging Face BertModel
whose forward does not trace, in dynamic mode with dict inputs, and a small ViTModel (static and QAT) whose
forward reads the weight dtype of a conv fxq replaced. `-m slow` runs the timm list and both
efficientnet_pytorch SAME convs at a small input size against PyTorch FX's default; the figures at native
sizes are in bench/thirdparty.md.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import fxq
from bench.protocol import NATIVE_ENGINE, native_fx_default
from bench.thirdparty import EFFICIENTNET_PYTORCH, MODELS, TIMM, ThirdPartyModel, batched, build, call, \
    compared_output, model_inputs
from fxq.backend.engine import using_engine
from fxq.backend.op_kinds import weighted_layers
from fxq.calibration import output_tensors
from helpers import sqnr

CALIBRATION_SAMPLES, EVAL_SAMPLES, BATCH = 8, 8, 4
MIN_INT8_FRACTION = 0.9  # the goal


def _quantize(spec: ThirdPartyModel, size: int, **options: Any) -> tuple[torch.nn.Module, torch.nn.Module, list]:
    """(float model, fxq's int8 model, evaluation batches) at `size`, calibrated on 2 batches of 4 crops."""
    model = build(spec, size)
    calibration = batched(model_inputs(spec, CALIBRATION_SAMPLES, seed=1, size=size), BATCH)
    evaluation = batched(model_inputs(spec, EVAL_SAMPLES, seed=2, size=size), BATCH)
    if options.get("mode") == "dynamic":
        quantized = fxq.quantize(model, calibration[0], **options)
    else:
        quantized = fxq.quantize(model, calibration[0], calibration_data=calibration, **options)
    return model, quantized, evaluation


def _compare(spec: ThirdPartyModel, model: torch.nn.Module, quantized: torch.nn.Module, evaluation: list) -> float:
    """Asserts the int8 outputs are finite and shaped like float's; returns the compared output's SQNR."""
    references, outputs = [], []
    with torch.no_grad():
        for batch in evaluation:
            expected, actual = call(model, batch), call(quantized, batch)
            assert type(actual) is type(expected)
            assert [t.shape for t in output_tensors(actual)] == [t.shape for t in output_tensors(expected)]
            assert all(torch.isfinite(t).all() for t in output_tensors(actual))
            references.append(compared_output(spec, expected).reshape(-1))
            outputs.append(compared_output(spec, actual).reshape(-1))
    return sqnr(torch.cat(references), torch.cat(outputs))


def _assert_float_layers_listed(quantized: torch.nn.Module) -> float:
    """Every conv/linear call left float is listed in summary.float_layers with a reason; returns the int8
    share of conv/linear calls."""
    layers = weighted_layers(quantized)
    listed = dict(fxq.summary_of(quantized).float_layers)
    for layer in layers.float:
        reason = next((why for name, why in listed.items() if layer == name or layer.startswith(name + ".")), None)
        assert reason, f"{layer} runs in float with no reason listed"
    return layers.int8_fraction


# --- default suite: one model per pattern ------------------------------------------------------------------

# SQNR floors (logits; BERT: last_hidden_state) on 8 crops or sequences, measured value minus ~3 dB
# (Intel Xeon, torch 2.14.1, fxq defaults). Random EfficientNets amplify any perturbation (tests/
# test_coverage.py measures 5.2 dB for torchvision's), so these floors catch a broken graph (a lost or
# misplaced op gives ~0 dB), not accuracy regressions.
EFFICIENTNET_PYTORCH_FLOOR_DB = 2.5  # measured 5.49
TF_EFFICIENTNET_FLOOR_DB = 1.0  # measured 3.83
BERT_DYNAMIC_FLOOR_DB = 50.0  # measured 53.00
YOLO_FLOOR_DB = 5.0  # raw head tensors (box distributions, class scores) at 96x96: measured 7.94


def _assert_plan_not_slower(quantized: torch.nn.Module) -> None:
    """Never slower than float, checked on the cost model's plan rather than on wall time."""
    plan = fxq.summary_of(quantized).estimated_latency_us
    if "fxq" in plan and "float" in plan:
        assert plan["fxq"] <= plan["float"], plan

def test_efficientnet_pytorch_static_same_padding_convs_are_int8():
    """Conv2dStaticSamePadding (an nn.Conv2d subclass: ZeroPad2d, then F.conv2d) at 64x64, built for that
    size. Before canonicalization 1 of 82 convs was int8 and the int8 model ran 3.5x slower than float."""
    pytest.importorskip("efficientnet_pytorch")
    spec = EFFICIENTNET_PYTORCH[0]
    model, quantized, evaluation = _quantize(spec, spec.test_size)
    measured = _compare(spec, model, quantized, evaluation)
    fraction = _assert_float_layers_listed(quantized)
    print(f"{spec.name}: int8 {fraction:.3f}, SQNR {measured:.2f} dB")
    assert fraction >= MIN_INT8_FRACTION
    _assert_plan_not_slower(quantized)
    assert measured > EFFICIENTNET_PYTORCH_FLOOR_DB


def test_timm_tf_efficientnet_conv2d_same_and_batchnorm_act_are_int8():
    """timm's Conv2dSame (F.pad for TF SAME padding, then conv) followed by BatchNormAct2d, at 64x64."""
    pytest.importorskip("timm")
    spec = MODELS["timm/tf_efficientnet_b0"]
    model, quantized, evaluation = _quantize(spec, 64)
    measured = _compare(spec, model, quantized, evaluation)
    fraction = _assert_float_layers_listed(quantized)
    summary = fxq.summary_of(quantized)
    print(f"{spec.name}: int8 {fraction:.3f}, SQNR {measured:.2f} dB, conversions {summary.conversions}")
    assert fraction >= MIN_INT8_FRACTION
    _assert_plan_not_slower(quantized)
    assert not [name for name, module in quantized.named_modules()
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]  # every BatchNorm folded
    assert measured > TF_EFFICIENTNET_FLOOR_DB


def test_bert_dynamic_with_dict_inputs():
    """A BertModel (its forward does not trace) in dynamic mode, example inputs given as a dict of
    input_ids and attention_mask as Hugging Face users write them: every Linear becomes dynamic int8."""
    pytest.importorskip("transformers")
    spec = MODELS["transformers/BertModel (dynamic)"]
    model, quantized, evaluation = _quantize(spec, spec.test_size, mode="dynamic", dynamic_where_faster=False)
    measured = _compare(spec, model, quantized, evaluation)
    layers = weighted_layers(quantized)
    print(f"{spec.name}: int8 {len(layers.int8)}/{len(layers.int8) + len(layers.float)}, SQNR {measured:.2f} dB")
    assert layers.float == [] and len(layers.int8) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert measured > BERT_DYNAMIC_FLOOR_DB


def test_ultralytics_yolov8n_whose_forward_loops_over_its_layers():
    """YOLOv8n's forward loops over its layers and reads each one's plain attributes (`m.f`, `m.i`: which
    earlier outputs it takes); it does not trace, so fxq quantizes its layers as regions, which must keep
    those attributes (fxq raised AttributeError: 'GraphModule' object has no attribute 'f'). The raw head
    tensors (box distributions, class scores) are compared against float."""
    pytest.importorskip("ultralytics")
    spec = MODELS["ultralytics/yolov8n"]
    model, quantized, evaluation = _quantize(spec, spec.test_size)
    measured = _compare(spec, model, quantized, evaluation)
    fraction = _assert_float_layers_listed(quantized)
    print(f"{spec.name}: int8 {fraction:.3f}, SQNR {measured:.2f} dB, plan {fxq.summary_of(quantized).estimated_latency_us}")
    assert [(layer.f, layer.i) for layer in quantized.model] == [(layer.f, layer.i) for layer in model.model]
    assert fraction >= MIN_INT8_FRACTION
    _assert_plan_not_slower(quantized)
    assert measured > YOLO_FLOOR_DB


def test_efficientnet_pytorch_dynamic_same_padding_blocks_trace():
    """image_size=None gives Conv2dDynamicSamePadding (F.pad sized from the input's shape in forward), at
    64x64. Each residual MBConvBlock, traced alone to find what blocks the trace, got its optional
    `drop_connect_rate` as a Proxy (`if drop_connect_rate:`) and stayed a float leaf (54 of 81 conv/linear
    calls int8) until trace.py bound a submodule's optional arguments to their defaults for that probe."""
    pytest.importorskip("efficientnet_pytorch")
    spec = MODELS["efficientnet_pytorch/efficientnet-b0 (dynamic SAME)"]
    model, quantized, evaluation = _quantize(spec, spec.test_size)
    measured = _compare(spec, model, quantized, evaluation)
    fraction = _assert_float_layers_listed(quantized)
    print(f"{spec.name}: int8 {fraction:.3f}, SQNR {measured:.2f} dB")
    assert fraction >= MIN_INT8_FRACTION
    assert not [name for name, _ in fxq.summary_of(quantized).float_layers if name.startswith("_blocks.")]
    _assert_plan_not_slower(quantized)
    assert measured > EFFICIENTNET_PYTORCH_FLOOR_DB  # measured 5.53


# transformers' ViTModel at a small size: hidden 64, 2 layers, 2 heads, 32x32 crops in 8x8 patches
SMALL_VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
                 patch_size=8)
VIT_FLOOR_DB = {"static": 23.0, "qat": 22.0}  # measured 25.92 and 25.35 (last_hidden_state, 8 crops)


@pytest.mark.parametrize("mode", ["static", "qat"])
def test_vit_reads_the_dtype_of_its_int8_patch_embedding(mode: str):
    """ViTModel.forward does not trace, so its traceable parts are quantized as regions, the patch
    embedding's conv among them; the forward then reads `patch_embeddings.projection.weight.dtype` to cast
    the pixel values, and crashed on the int8 GraphModule in its place (no `weight`)."""
    transformers = pytest.importorskip("transformers")
    spec = MODELS["transformers/ViTModel (static)"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.ViTModel(transformers.ViTConfig(**SMALL_VIT)).eval()
    calibration = batched(model_inputs(spec, CALIBRATION_SAMPLES, seed=1, size=32), BATCH)
    evaluation = batched(model_inputs(spec, EVAL_SAMPLES, seed=2, size=32), BATCH)
    if mode == "static":
        quantized = fxq.quantize(model, calibration[0], calibration_data=calibration)
    else:  # observers trained on the calibration batches, no training steps
        prepared = fxq.prepare_qat(model, calibration[0])
        with torch.no_grad():
            for batch in calibration:
                call(prepared, batch)
        quantized = fxq.convert(fxq.freeze_observers(prepared))
    projection = "embeddings.patch_embeddings.projection"
    assert quantized.get_submodule(projection).weight.dtype == torch.float32
    measured = _compare(spec, model, quantized, evaluation)
    layers = weighted_layers(quantized)
    assert layers.float == [] and any(name.startswith(projection + ".") for name in layers.int8)
    float_code = [what for what, _ in fxq.summary_of(quantized).float_ops]
    assert any(what.startswith("embeddings.patch_embeddings: runs as Python in float") for what in float_code)
    print(f"ViTModel ({mode}): SQNR {measured:.2f} dB")
    assert measured > VIT_FLOOR_DB[mode]


# --- slow: the timm list and both efficientnet_pytorch convs against PyTorch FX's default ------------------

# Models that miss a goal today, with what was measured here (96x96, 8 calibration and 8 evaluation crops,
# fxq defaults, Intel Xeon, 2026-12-07): strict, so a fix makes the test fail until its mark is removed.
# The SQNR misses share one cause: with so few calibration crops, fxq's tight activation ranges clip the
# evaluation crops that go beyond them, and those few crops dominate the SQNR over the set; PyTorch's 7-bit
# activations leave twice the range as headroom. Checked at 96x96 on 16 evaluation crops for resnet50d,
# hrnet_w18_small, mnasnet_100 and mobilenetv3_large_100: the median crop's SQNR favours fxq on each, and with
# 64 calibration crops so does the SQNR over the set (18.1 against 14.4 dB, 19.2 against 13.0, 11.6 against
# 3.5, 8.2 against 3.7).
_SQNR_BELOW_FX = "SQNR over 8 crops below PyTorch FX's default ({} against {} dB): few calibration crops"
KNOWN_FAILURES: dict[str, tuple[type[BaseException], str]] = {
    "timm/mobilenetv3_large_100": (AssertionError, _SQNR_BELOW_FX.format(4.55, 5.66)),
    "timm/resnet50d": (AssertionError, _SQNR_BELOW_FX.format(7.68, 12.94)),
    "timm/hrnet_w18_small": (AssertionError, _SQNR_BELOW_FX.format(7.44, 12.08)),
    "timm/seresnet50": (AssertionError, _SQNR_BELOW_FX.format(2.84, 5.15)),
    "timm/densenet121": (AssertionError, _SQNR_BELOW_FX.format(8.27, 10.99)),
    "timm/mnasnet_100": (AssertionError, _SQNR_BELOW_FX.format(2.91, 5.96)),
}


def _slow_params() -> list[Any]:
    params = []
    for spec in TIMM + EFFICIENTNET_PYTORCH:
        marks = []
        if spec.name in KNOWN_FAILURES:
            raises, reason = KNOWN_FAILURES[spec.name]
            marks = [pytest.mark.xfail(strict=True, raises=raises, reason=reason)]
        params.append(pytest.param(spec.name, id=spec.name, marks=marks))
    return params


# fxq's SQNR may fall this far below PyTorch's before the test fails: 8 evaluation crops of a random-weight
# network weigh crops by their logits' energy and one outlier crop can move the figure by about a dB (see
# bench/generalization.py's median_crop_sqnr_db), so a smaller gap is not a measured difference.
SQNR_TOLERANCE_DB = 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", _slow_params())
def test_model_meets_the_goals(name: str):
    spec = MODELS[name]
    pytest.importorskip(spec.family)
    model, quantized, evaluation = _quantize(spec, spec.test_size)
    summary = fxq.summary_of(quantized)
    with using_engine(summary.engine):
        measured = _compare(spec, model, quantized, evaluation)
    fraction = _assert_float_layers_listed(quantized)
    calibration = batched(model_inputs(spec, CALIBRATION_SAMPLES, seed=1, size=spec.test_size), BATCH)
    # PyTorch's flow fails on many timm models (its tracer, or its int8 model when run: XCiT and EdgeNeXt
    # read their conv's weight.device): then there is nothing to beat
    try:
        native = native_fx_default(model, calibration)
        with using_engine(NATIVE_ENGINE), torch.no_grad():
            native_db = sqnr(torch.cat([model(batch).reshape(-1) for batch in evaluation]),
                             torch.cat([native(batch).reshape(-1) for batch in evaluation]))
    except Exception as exc:
        native, native_db = None, f"{type(exc).__name__}"
    plan = summary.estimated_latency_us
    print(f"{name}: int8 {fraction:.3f}, SQNR {measured:.2f} dB (FX default {native_db}), plan {plan}")
    assert fraction >= MIN_INT8_FRACTION
    if native is not None:
        assert measured >= native_db - SQNR_TOLERANCE_DB
    _assert_plan_not_slower(quantized)
