"""Each accuracy technique measured on its own, on real ImageNet MobileNetV2 and real photographs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxq

from fxq.backend.engine import fake_quantize_weight
from fxq.frontend.rewrite import Clamp, fold_batchnorm, fuse_clamping_activations
from fxq.frontend.trace import trace_model
from fxq.recovery.equalization import equalize, find_groups
from fxq.recovery.layers import weighted_nodes
from fxq.recovery import rounding
from fxq.recovery.bias_correction import correct_bias
from fxq.recovery.layerwise import PairedLayer
from fxq.recovery.rounding import optimize_rounding, refit_on_quantized_inputs
from fxq.recovery.simulation_pass import recover_on_simulation


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


@pytest.fixture(scope="module")
def simulated(folded, batches):
    """(equalized float graph, its float simulation of int8, the weight grid) as the static flow builds them.

    The simulation runs no int8 kernel, so it is built the same on every CPU: 8-bit activations and
    weights, as on a CPU whose kernel does not saturate.
    """
    import dataclasses

    from fxq.backend import engine
    from fxq.calibration import run_batches
    from fxq.config import QuantOptions

    gm = copy.deepcopy(folded[0])
    equalize(gm, batches)
    options = QuantOptions.from_kwargs(mode="static", backend="onednn", reduce_range=False)
    choice = dataclasses.replace(engine.select_engine(options), kernel_saturates=False)
    prepared = engine.prepare_static(copy.deepcopy(gm), engine.build_static_qconfig_mapping(gm, options, choice),
                                     batches[0], choice)
    run_batches(prepared, batches)
    return gm, engine.convert_reference(prepared, choice), engine.weight_grid(options, choice)


def _output_shift(float_gm, simulation, name, crops) -> torch.Tensor:
    """Per-channel mean of (simulated - float) pre-activation output of layer `name` on `crops`."""
    outputs = []
    for model in (float_gm, simulation):
        module = model.get_submodule(name)
        layer = module[0] if isinstance(module, torch.nn.Sequential) else module
        hook = layer.register_forward_hook(lambda m, i, o: outputs.append(o))
        with torch.no_grad():
            model(crops)
        hook.remove()
    return (outputs[1] - outputs[0]).mean(dim=(0, 2, 3))


def test_bias_correction_removes_mean_shift_left_by_upstream_quantization(simulated, batches, eval_crops, mobilenet):
    float_gm, simulation, grid = simulated
    simulation = copy.deepcopy(simulation)
    name = "features.16.conv.2"  # a late projection (no clamp): its shift comes mostly from upstream layers
    before = _output_shift(float_gm, simulation, name, eval_crops[:32]).abs().mean()
    with torch.no_grad():
        reference = mobilenet(eval_crops)
        before_db = _sqnr(reference, simulation(eval_crops))
    _, corrections = recover_on_simulation(simulation, float_gm, batches, {}, refit_weights=False,
                                           correct_biases=True, grid=grid)
    after = _output_shift(float_gm, simulation, name, eval_crops[:32]).abs().mean()
    with torch.no_grad():
        after_db = _sqnr(reference, simulation(eval_crops))
    assert len(corrections) == 53  # every conv and the classifier
    assert after < 0.5 * before, (float(before), float(after))  # measured on images it was not fitted on
    assert after_db > before_db + 1.0, (before_db, after_db)


def test_bias_correction_after_a_clamp_minimizes_the_clamped_error():
    """Zero-mean input noise before a ReLU: where the float output is positive the error averages zero, so
    the mean over those positions (the estimate this replaced) leaves the bias alone, but the noise the
    ReLU lets through where the float output is negative is all positive. The correction, a Newton step on
    the squared error of the clamped outputs, lowers the bias and that error, on samples it was not
    fitted on too."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4))
        layer.bias.zero_()

    def noisy(count):
        float_inputs = [torch.randn(4000, 4) for _ in range(count)]
        return float_inputs, [x + 0.5 * torch.randn_like(x) for x in float_inputs]

    def clamped_mse(model, samples):
        x, noisy_x = samples
        with torch.no_grad():
            error = torch.relu(model(torch.cat(noisy_x))) - torch.relu(layer(torch.cat(x)))
        return float(error.pow(2).mean())

    fitted, held_out = noisy(2), noisy(1)  # (float inputs, simulated inputs)
    simulated = copy.deepcopy(layer)
    pair = PairedLayer("layer", simulated, layer, Clamp(0.0, float("inf")), fitted[1], fitted[0])
    before = clamped_mse(simulated, held_out)
    correction = correct_bias(pair)
    assert correction.mean_shift > 0.1, correction  # the masked mean would be ~0 here
    assert (simulated.bias < -0.1).all(), simulated.bias
    assert clamped_mse(simulated, held_out) < 0.95 * before, (before, clamped_mse(simulated, held_out))


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


def test_layers_kept_float_by_an_enclosing_name_get_no_recovery(folded, simulated, batches):
    gm = copy.deepcopy(folded[0])
    rounded = optimize_rounding(gm, batches, skip=["features.1", torch.nn.Linear])
    assert not any(name.startswith("features.1.") or name == "classifier.1" for name in rounded)
    assert "features.2.conv.0.0" in rounded
    float_gm, simulation, grid = simulated
    simulation = copy.deepcopy(simulation)
    kept = simulation.get_submodule("features.1.conv.0.0")[0].bias.detach().clone()
    weights, corrections = recover_on_simulation(simulation, float_gm, batches, {}, refit_weights=True,
                                                 correct_biases=True, grid=grid, skip=["features.1", torch.nn.Linear])
    assert not any(c.layer.startswith("features.1.") or c.layer == "classifier.1" for c in corrections)
    assert "features.2.conv.0.0" in weights and not any(name.startswith("features.1.") for name in weights)
    assert any(c.layer == "features.2.conv.0.0" for c in corrections)
    assert torch.equal(simulation.get_submodule("features.1.conv.0.0")[0].bias, kept)


def test_refit_on_quantized_inputs_beats_rounding_on_float_inputs(folded, simulated, batches, eval_crops, mobilenet):
    """The simulation pass: weights refit to quantized inputs (well-determined layers only), then biases."""
    float_gm, simulation, grid = simulated
    rounded = optimize_rounding(float_gm, batches, grid)
    scores = {}
    for refit in (False, True):
        model = copy.deepcopy(simulation)
        weights, _ = recover_on_simulation(model, float_gm, batches, rounded, refit_weights=refit,
                                           correct_biases=True, grid=grid)
        with torch.no_grad():
            scores[refit] = _sqnr(mobilenet(eval_crops), model(eval_crops))
        refitted = {name for name in weights if weights[name] is not rounded.get(name)}
    assert scores[True] > scores[False] + 0.5, scores
    # early, high-resolution layers have thousands of samples per weight; the 7x7 ones too few
    assert {"features.0.0", "features.1.conv.0.0", "features.2.conv.0.0"} <= refitted
    assert "features.17.conv.0.0" not in refitted and "classifier.1" not in refitted
    for name in refitted:
        item = weights[name]
        steps = item.values / item.scale.view((-1,) + (1,) * (item.values.dim() - 1))
        assert torch.allclose(steps, steps.round(), atol=1e-3)
        assert steps.min() >= item.quant_min - 1e-3 and steps.max() <= item.quant_max + 1e-3


def test_held_out_shrinkage_keeps_a_real_correction_and_drops_one_the_clamp_cuts_off():
    """A layer whose quantized inputs gain 25%: the refit undoes it in full on the rows whose outputs pass
    the clamp, and leaves alone a row the clamp always cuts off (its error costs nothing)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 3)
    with torch.no_grad():
        layer.bias[2] = -100.0
    float_inputs = [torch.randn(2000, 8) for _ in range(4)]
    pair = PairedLayer("layer", copy.deepcopy(layer), layer, Clamp(0.0, float("inf")),
                       [1.25 * x for x in float_inputs], float_inputs)
    weight = layer.weight.detach()
    scale = rounding.weight_qparams(weight)[0]
    grouped, _ = rounding._grouped(layer, weight, scale)
    chunks = rounding._chunks(pair)
    moments, crosses = rounding._fold_moments(layer, chunks)
    assert len(moments) == 4
    shrinkage = rounding._held_out_shrinkage(pair, chunks, grouped.double(), moments, crosses,
                                             sum(moments), sum(crosses)).flatten()
    assert (shrinkage[:2] > 0.95).all() and shrinkage[2] == 0, shrinkage
    refit = refit_on_quantized_inputs(pair)
    target = weight / 1.25
    assert (refit.values[:2] - target[:2]).norm() < 0.1 * (weight[:2] - target[:2]).norm()
    assert (refit.values[2] - weight[2]).abs().max() <= 2 * scale[2]  # rounded, not corrected


@pytest.mark.slow
def test_held_out_shrinkage_beats_the_full_refit(simulated, eval_crops, mobilenet, monkeypatch):
    """Cross-validated shrinkage of each row's correction against the same refit taken in full (FOLDS=1),
    on bench/accuracy.py's 64 calibration crops split into 4 folds. On the default suite's 32 crops the
    margin was within what float rounding moves: 19.66 against 19.59 dB on an AMD EPYC without VNNI,
    19.83 against 19.55 on an Intel Xeon, 19.64 against 19.82 on an AMD EPYC with AVX-512 (the shrinkage
    lost). With 64, fxq's default gains +0.77 dB from it (AMD EPYC, AVX2, 7-bit weights) and +0.70 dB
    (AVX-512 VNNI, 8-bit weights, onednn with conv-add fusion)."""
    from fxq.samples import random_crops

    batches = [(chunk,) for chunk in random_crops(64, seed=1).split(16)]
    float_gm, simulation, grid = simulated
    rounded = optimize_rounding(float_gm, batches, grid)
    scores = {}
    for folds in (1, rounding.FOLDS):
        monkeypatch.setattr(rounding, "FOLDS", folds)
        model = copy.deepcopy(simulation)
        recover_on_simulation(model, float_gm, batches, rounded, refit_weights=True, correct_biases=True,
                              grid=grid)
        with torch.no_grad():
            scores[folds] = _sqnr(mobilenet(eval_crops), model(eval_crops))
    assert scores[rounding.FOLDS] > scores[1], scores


def test_a_depthwise_conv_with_a_channel_multiplier_quantizes():
    """FastViT's depthwise convs have two output channels per input channel (groups = in_channels, out =
    2 x in): optimized rounding keeps them on nearest rounding instead of failing on the shapes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, groups=16),
                          nn.ReLU(), nn.Conv2d(32, 8, 1)).eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    quantized = fxq.quantize(model, batches[0][:1], calibration_data=batches)
    assert fxq.summary_of(quantized).rounded_layers == 2  # the multiplier conv is not among them
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert _sqnr(model(x), quantized(x)) > 25.0


def test_error_compensated_rounding_leaves_the_weights_it_reads_alone():
    """GPTQ updates a working copy; the float layer's weight (a depthwise [C, 1, K] view here, whose
    transpose is already contiguous) must not change."""
    torch.manual_seed(0)
    for weight in (torch.randn(8, 1, 9), torch.randn(1, 16, 12)):
        inputs = torch.randn(weight.shape[0], weight.shape[2], 200)
        before = weight.clone()
        scale = (weight.abs().amax(-1) / 127).reshape(weight.shape[0], weight.shape[1])
        values = rounding._round_columns(weight, (inputs @ inputs.transpose(1, 2)).double(), scale, -128, 127)
        assert torch.equal(weight, before)
        steps = values / scale.unsqueeze(-1)
        assert torch.allclose(steps, steps.round(), atol=1e-3) and not torch.equal(values, weight)
