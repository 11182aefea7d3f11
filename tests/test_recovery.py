"""Each accuracy technique measured on its own, on real ImageNet MobileNetV2 and real photographs."""

from __future__ import annotations

import copy

import pytest
import torch

from fxq.backend.engine import fake_quantize_weight
from fxq.frontend.rewrite import Clamp, fold_batchnorm, fuse_clamping_activations
from fxq.frontend.trace import trace_model
from fxq.recovery.bias_correction import correct_biases
from fxq.recovery.equalization import equalize, find_groups
from fxq.recovery.layers import weighted_nodes
from fxq.recovery.rounding import optimize_rounding


def _sqnr(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    return float(20 * torch.log10(reference.norm() / (reference - approximation).norm()))


@pytest.fixture(scope="module")
def folded(mobilenet):
    """MobileNetV2 traced, BN folded and clamps fused (the graph every recovery pass starts from)."""
    gm, leaves = trace_model(copy.deepcopy(mobilenet))
    assert leaves == []
    folds = fold_batchnorm(gm)
    fusions = fuse_clamping_activations(gm)
    return gm, folds, fusions


@pytest.fixture(scope="module")
def batches(calibration_crops):
    return [(chunk,) for chunk in calibration_crops.split(16)]


def _with_weights(gm, weights):
    copy_ = copy.deepcopy(gm)
    for node, layer, _ in weighted_nodes(copy_):
        layer.weight.data = weights(str(node.target), layer.weight.data)
    return copy_


def test_rewrites_keep_float_function(mobilenet, folded, eval_crops):
    gm, folds, fusions = folded
    assert len(folds) == 52  # every BatchNorm of MobileNetV2 follows a conv
    assert len(fusions) == 35  # every ReLU6
    assert sum(isinstance(m, Clamp) for m in gm.modules()) == 35
    with torch.no_grad():
        assert _sqnr(mobilenet(eval_crops), gm(eval_crops)) > 100


def test_equalization_shrinks_channel_spread_and_keeps_function(folded, batches, eval_crops):
    gm = copy.deepcopy(folded[0])
    with torch.no_grad():
        before = gm(eval_crops)
    groups = find_groups(gm)
    residual = [g for g in groups if len(g.producers) > 1]
    assert residual, "the residual streams of MobileNetV2 form multi-producer groups"
    done = equalize(gm, batches)
    assert len(done) == len(groups)
    first = done[0]
    assert first.producers == ("features.0.0",)
    assert first.range_spread_before > 50 and first.range_spread_after < 1.5  # depthwise consumer: flat
    assert sum(g.range_spread_after for g in done) < 0.5 * sum(g.range_spread_before for g in done)
    with torch.no_grad():
        after = gm(eval_crops)
    assert ((after - before).norm() / before.norm()) < 1e-5


def test_bias_correction_removes_mean_shift(folded, batches, calibration_crops):
    gm = copy.deepcopy(folded[0])
    name = "features.1.conv.0.0"  # the depthwise conv most hurt by weight rounding
    captured = {}
    layer = gm.get_submodule(name)[0]
    hook = gm.get_submodule(name).register_forward_hook(lambda m, i, o: captured.__setitem__("x", i[0]))
    float_bias = layer.bias.detach().clone()

    def mean_shift() -> float:
        with torch.no_grad():
            gm(calibration_crops[:16])
            x = captured["x"]
            exact = torch.nn.functional.conv2d(x, layer.weight, float_bias, layer.stride, layer.padding,
                                               layer.dilation, layer.groups)
            rounded = torch.nn.functional.conv2d(x, fake_quantize_weight(layer.weight), layer.bias, layer.stride,
                                                 layer.padding, layer.dilation, layer.groups)
        return float((rounded - exact).mean(dim=(0, 2, 3)).abs().mean())

    before = mean_shift()
    corrections = correct_biases(gm, batches)
    after = mean_shift()
    hook.remove()
    assert any(c.layer == name for c in corrections)
    assert after < 0.2 * before


def test_optimized_rounding_beats_nearest(folded, batches, eval_crops, mobilenet):
    gm = folded[0]
    rounded = optimize_rounding(gm, batches)
    # every conv; the 1280-column classifier is wider than MAX_COLUMNS and keeps nearest rounding
    assert len(rounded) == 52 and "classifier.1" not in rounded
    for item in rounded.values():  # values lie on the engine's int8 grid
        steps = item.values / item.scale.view((-1,) + (1,) * (item.values.dim() - 1))
        assert torch.allclose(steps, steps.round(), atol=1e-3)
        assert steps.min() >= item.quant_min - 1e-3 and steps.max() <= item.quant_max + 1e-3
    nearest = _with_weights(gm, lambda name, w: fake_quantize_weight(w))
    optimized = _with_weights(gm, lambda name, w: rounded[name].values if name in rounded else fake_quantize_weight(w))
    with torch.no_grad():
        reference = mobilenet(eval_crops)
        nearest_db, optimized_db = _sqnr(reference, nearest(eval_crops)), _sqnr(reference, optimized(eval_crops))
    assert optimized_db > nearest_db + 6, (nearest_db, optimized_db)


def test_equalized_clamps_that_are_reached_share_the_top_of_the_range(folded, batches):
    """An int8 conv+ReLU kernel clips only at the tensor's range: every channel that reaches its ReLU6
    must have its rescaled ceiling at the top, or int8 lets through what float clips."""
    gm = copy.deepcopy(folded[0])
    producer = gm.get_submodule("features.1.conv.0.0")  # depthwise + ReLU6 -> dense 1x1 projection
    captured = []
    hook = producer.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    with torch.no_grad():
        for batch in batches:
            gm(*batch)
    reached_before = torch.stack([(o >= 6.0 * 0.999).flatten(2).any(2).any(0) for o in captured]).any(0)
    assert reached_before.sum() >= 2  # several channels saturate on real photographs
    captured.clear()
    equalize(gm, batches)
    with torch.no_grad():
        for batch in batches:
            gm(*batch)
    hook.remove()
    ceiling = producer[1].high.flatten()
    peak = torch.stack([o.amax(dim=(0, 2, 3)) for o in captured]).amax(0)
    assert ceiling.numel() == peak.numel() and ceiling.unique().numel() > 1  # the equalization did rescale
    top = peak.max()
    assert torch.allclose(ceiling[reached_before], top.expand(int(reached_before.sum())), rtol=1e-4)
    assert (peak <= ceiling[reached_before].min() * (1 + 1e-4)).all()  # no channel reaches beyond it


def test_layers_kept_float_by_an_enclosing_name_get_no_recovery(folded, batches):
    gm = copy.deepcopy(folded[0])
    biases = {name: gm.get_submodule(name)[0].bias.detach().clone() for name in ("features.1.conv.0.0",)}
    rounded = optimize_rounding(gm, batches, skip=["features.1", torch.nn.Linear])
    corrections = correct_biases(gm, batches, skip=["features.1", torch.nn.Linear])
    assert not any(name.startswith("features.1.") or name == "classifier.1" for name in rounded)
    assert not any(c.layer.startswith("features.1.") or c.layer == "classifier.1" for c in corrections)
    assert "features.2.conv.0.0" in rounded and any(c.layer == "features.2.conv.0.0" for c in corrections)
    assert torch.equal(gm.get_submodule("features.1.conv.0.0")[0].bias, biases["features.1.conv.0.0"])
