"""fxq.sensitivity: per-layer accumulated, own and solo SQNR on models where the answer is known."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys

import pytest
import torch
from torch import nn

from fxq import QuantOptions, quantize, samples
from fxq.analysis.metrics import ErrorStats, channel_range_ratio, sqnr_db
from fxq.analysis.sensitivity import SensitivityReport, float_units, sensitivity
from fxq.calibration import output_tensors
from fxq.backend.engine import using_engine
from fxq.backend.op_kinds import is_quantized_module
from fxq.errors import ConfigError, FxqError, InputError, MissingExtraError
from fxq.summary import summary_of

OUTLIER_SCALE = 100.0  # planted weights, in units of the layer's largest ordinary weight


class Planted(nn.Module):
    """conv -> conv (planted outliers) -> 1x1 identity conv -> conv, dense output (no pooling).

    `mid` has, in every output row, a +K and a -K weight on two input channels that `stem` computes
    identically: they cancel exactly in float (and in int8, where both inputs get the same codes), but the
    per-channel weight scale must span K, so the row's ordinary weights lose nearly all their precision.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.ident = nn.Conv2d(16, 16, 1, bias=False)
        self.tail = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.ident(self.mid(self.stem(x))))


# Equalization would move the planted weight range into stem's activations, and the simulation pass
# (refit to quantized inputs, bias correction) would repair part of it: that is their job. Without them
# the damage stays where it was planted. 7-bit activations keep 8-bit weights on every CPU (a saturating
# kernel otherwise gets 7-bit weights: on -64..63 the plant gave -1 dB instead of 8 dB).
PLANTED_OPTIONS = dict(equalize=False, optimize_rounding=False, bias_correction=False, reduce_range=True)


def planted_model() -> Planted:
    torch.manual_seed(0)
    model = Planted().eval()
    with torch.no_grad():
        model.ident.weight.copy_(torch.eye(16).view(16, 16, 1, 1))
        stem = model.stem[0]
        stem.weight[1], stem.bias[1] = stem.weight[0], stem.bias[0]
        mid = model.mid[0].weight
        big = OUTLIER_SCALE * mid.abs().max()
        mid[:, 0, 1, 1], mid[:, 1, 1, 1] = big, -big
    return model


@pytest.fixture(scope="session")
def photo_batches():
    calibration = samples.random_crops(16, seed=1, size=64)
    evaluation = samples.random_crops(16, seed=2, size=64)
    return list(calibration.split(8)), list(evaluation.split(8))


@pytest.fixture(scope="session")
def planted_report(photo_batches):
    calibration, evaluation = photo_batches
    return sensitivity(planted_model(), calibration[0][:1], calibration_data=calibration, eval_data=evaluation,
                       **PLANTED_OPTIONS)


def test_planted_outlier_layer_ranks_first_by_impact(planted_report):
    ranked = planted_report.ranked()
    assert [layer.name for layer in ranked][0] == "mid.0"
    assert ranked[0].solo_sqnr_db < ranked[1].solo_sqnr_db - 10.0
    assert planted_report["mid.0"].own_sqnr_db < 25.0
    assert str(planted_report).index("mid.0") < str(planted_report).index("stem.0")


def test_identity_layer_own_error_is_free_of_upstream_error(planted_report):
    ident = planted_report["ident"]
    assert ident.own_sqnr_db > 35.0
    # what reaches it from mid.0 dominates its accumulated error, not its own rounding
    assert ident.sqnr_db < ident.own_sqnr_db - 10.0
    assert ident.sqnr_db == pytest.approx(planted_report["mid.0"].sqnr_db, abs=1.0)
    assert ident.weight_range_ratio == pytest.approx(1.0)


def test_last_layer_solo_equals_own_and_accumulated_equals_end_to_end(planted_report):
    last = planted_report.layers[-1]
    assert last.name == "tail.0"
    assert last.solo_sqnr_db == pytest.approx(last.own_sqnr_db, abs=1e-6)
    assert last.sqnr_db == pytest.approx(planted_report.end_to_end_sqnr_db, abs=1e-6)


def test_rows_carry_every_documented_attribute(planted_report):
    assert [layer.index for layer in planted_report.layers] == list(range(4))
    assert sorted(layer.impact_rank for layer in planted_report.layers) == [1, 2, 3, 4]
    for layer in planted_report.layers:
        assert layer.op in ("ConvReLU2d", "Conv2d")
        for attribute in ("sqnr_db", "own_sqnr_db", "solo_sqnr_db", "mse", "cosine", "max_abs_error",
                          "weight_sqnr_db", "weight_range_ratio", "activation_min", "activation_max",
                          "outlier_ratio"):
            assert math.isfinite(getattr(layer, attribute)), (layer.name, attribute)
        assert 0.9 < layer.cosine <= 1.0
        assert layer.activation_min >= 0.0 or layer.op == "Conv2d"
    assert planted_report["stem.0"].pattern == "conv-relu"
    assert planted_report["ident"].pattern is None


def test_target_sqnr_option_adds_a_verified_recommendation(photo_batches):
    calibration, evaluation = photo_batches
    report = sensitivity(planted_model(), calibration[0][:1], calibration_data=calibration, eval_data=evaluation,
                         equalize=False, target_sqnr_db=30.0)
    assert report.recommendation.keep_float[:1] == ["mid.0"]
    assert report.recommendation.verified_sqnr_db >= 30.0
    assert "recommended keep_float for 30 dB" in str(report)
    assert "| mid.0 " in report.to_markdown()


def test_json_and_csv_export(planted_report, tmp_path):
    data = json.loads(planted_report.to_json(tmp_path / "report.json"))
    assert [row["name"] for row in data["layers"]] == [layer.name for layer in planted_report.layers]
    assert data["layers"][1]["solo_sqnr_db"] == pytest.approx(planted_report["mid.0"].solo_sqnr_db)
    assert json.loads((tmp_path / "report.json").read_text()) == data
    rows = list(csv.DictReader(io.StringIO(planted_report.to_csv(tmp_path / "report.csv"))))
    assert [row["name"] for row in rows] == [layer.name for layer in planted_report.layers]
    assert float(rows[1]["own_sqnr_db"]) == pytest.approx(planted_report["mid.0"].own_sqnr_db)


def test_recommend_keeps_the_planted_layer_in_float_and_verifies(planted_report):
    target = planted_report.end_to_end_sqnr_db + 10.0
    names = planted_report.recommend(target)
    assert names[0] == "mid.0"
    recommendation = planted_report.recommendation
    assert recommendation.verified_sqnr_db >= target
    assert recommendation.keep_float == names
    int8_names = {name for name, module in recommendation.model.named_modules()
                  if is_quantized_module(module)}
    assert "mid.0" not in int8_names and "stem.0" in int8_names
    assert planted_report.recommend(planted_report.end_to_end_sqnr_db - 1.0) == []
    with pytest.raises(ConfigError, match="target_sqnr_db"):
        planted_report.recommend(-3)


def test_recommend_scales_its_first_prediction_by_the_share_of_solo_noise_that_shows(planted_report, monkeypatch):
    """Solo noises overcount: here ten units of 0.005 each sum to five times the all-int8 noise (0.01),
    and keeping k units float removes 0.001 k. Reaching 28 dB (noise 0.00158) takes nine units; the
    share (0.2) predicts nine at once, where the raw solo noises would predict two."""
    from fxq.analysis.sensitivity import FloatUnit

    units = [FloatUnit(f"unit{i}", (f"unit{i}",), 0.005, 100.0) for i in range(10)]
    measured: list[list[str]] = []

    def measure_with_float(names: list[str]) -> tuple[nn.Module, float]:
        measured.append(names)
        return planted_report.quantized, -10.0 * math.log10(0.01 - 0.001 * len(names))

    monkeypatch.setattr(planted_report, "_units", units)
    monkeypatch.setattr(planted_report, "end_to_end_sqnr_db", 20.0)
    monkeypatch.setattr(planted_report, "_measure_with_float", measure_with_float)
    monkeypatch.setattr(planted_report, "recommendation", None)
    kept = planted_report.recommend(28.0)
    assert [len(names) for names in measured[:2]] == [9, 8]  # predicted, then checked one unit lower
    assert kept == [f"unit{i}" for i in range(9)]
    assert planted_report.recommendation.verified_sqnr_db == pytest.approx(30.0)


def test_plot_needs_matplotlib(planted_report, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(MissingExtraError, match="matplotlib"):
        planted_report.plot()


def test_plot_draws_every_layer(planted_report, tmp_path):
    pytest.importorskip("matplotlib")
    figure = planted_report.plot(tmp_path / "sqnr.png")
    assert (tmp_path / "sqnr.png").stat().st_size > 0
    assert len(figure.axes[0].get_xticklabels()) == len(planted_report.layers)


def test_bad_options_and_data_are_rejected(photo_batches):
    calibration, _ = photo_batches
    with pytest.raises(ConfigError, match="qat"):
        sensitivity(planted_model(), calibration[0][:1], calibration_data=calibration, mode="qat")
    with pytest.raises(InputError, match="eval_data"):
        sensitivity(planted_model(), calibration[0][:1], calibration_data=calibration,
                    eval_data=[(calibration[0], calibration[0])])


class TwoInputs(nn.Module):
    """Structure only: two inputs, an in-place add and ReLU, a module called twice, nested dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        u = self.a(x)
        u += self.b(y)
        u = self.relu(u)
        w = self.shared(self.shared(u))
        return {"logits": self.fc(w.mean((2, 3))), "maps": (w, u)}


# The two tests below follow each layer's own input and output; onednn would run b with the add after it
# as one kernel (tests/test_conv_add.py covers that), so they use an engine that cannot fuse.
UNFUSED = dict(backend="x86") if "x86" in torch.backends.quantized.supported_engines else {}


def test_structure_two_inputs_inplace_ops_shared_module_dict_output():
    torch.manual_seed(0)
    model = TwoInputs().eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    batches = [(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)) for _ in range(3)]
    # equalize=False: equalization would take the shared module's first call as producer and its second
    # as consumer of one group, rescaling one weight twice (sensitivity refuses such a reference, see below)
    report = sensitivity(model, batches[0], calibration_data=batches, equalize=False, **UNFUSED)
    assert [layer.name for layer in report.layers] == ["a", "b", "shared", "fc"]
    for layer in report.layers:
        assert math.isfinite(layer.own_sqnr_db) and math.isfinite(layer.solo_sqnr_db), layer.name
    # first layers read the quantized model inputs, exactly as in the int8 model (a's output is then added
    # to in place: the cached float value must not change)
    assert report["a"].sqnr_db == pytest.approx(report["a"].own_sqnr_db, abs=1e-6)
    assert report["b"].sqnr_db == pytest.approx(report["b"].own_sqnr_db, abs=1e-6)
    # the shared module's second call reads the first call's int8 output: its own grid, not the first input's
    assert report["shared"].own_sqnr_db == pytest.approx(report["shared"].sqnr_db, abs=3.0)
    assert model.relu.inplace is True  # the user's model is untouched
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("layer", ["a", "b", "shared"])
def test_solo_matches_a_full_forward_with_only_that_layer_int8(layer):
    """The solo runs reuse cached float values; a plain forward of the user's model must agree."""
    torch.manual_seed(0)
    model = TwoInputs().eval()
    batches = [(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)) for _ in range(2)]
    report = sensitivity(model, batches[0], calibration_data=batches, equalize=False, **UNFUSED)
    int8_layer = report.quantized.get_submodule(layer)
    grids = iter([])

    def substitute(_module, inputs, _output):
        scale, zero_point = next(grids)
        return int8_layer(torch.quantize_per_tensor(inputs[0], scale, zero_point, torch.quint8)).dequantize()

    # each call reads the int8 grid the int8 model feeds it: the layer's input grid, then its own output grid
    calls = [(report[layer].input_scale, report[layer].input_zero_point),
             (float(int8_layer.scale), int(int8_layer.zero_point))]
    stats = ErrorStats()
    with torch.no_grad(), using_engine(report.engine):
        for batch in batches:
            reference = output_tensors(model(*batch))
            grids = iter(calls)
            handle = getattr(model, layer).register_forward_hook(substitute)
            try:
                perturbed = output_tensors(model(*batch))
            finally:
                handle.remove()
            for expected, actual in zip(reference, perturbed):
                stats.update(expected, actual)
    assert report[layer].solo_sqnr_db == pytest.approx(stats.sqnr_db, abs=0.01)


class Mutating(nn.Module):
    """`mode` "lost": an in-place add whose result is unused (FX drops it); "shared": ReLU_ on a tensor that
    is also returned (it cannot be made out of place without changing the output)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor):
        u = self.a(x)
        if self.mode == "lost":
            u.add_(self.b(x))
            return u
        s = u + self.b(x)
        return s.relu_(), s


@pytest.mark.parametrize("mode", ["lost", "shared"])
def test_in_place_ops_are_analyzed_out_of_place_as_quantize_runs_them(mode):
    """The float reference goes through fxq.quantize's own rewrite of in-place ops (fxq.pipeline.trace_float_graph),
    so the shadow runs see the model's function: an in-place add whose result FX would drop, and a ReLU_
    on a tensor that is also returned (both outputs are the clamped tensor, as in eager mode)."""
    torch.manual_seed(0)
    model = Mutating(mode).eval()
    batches = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    report = sensitivity(model, batches[0], calibration_data=batches)
    assert {layer.name for layer in report.layers} == {"a", "b"}
    assert report.end_to_end_sqnr_db > 25.0


def test_a_rewrite_that_changed_the_function_is_refused(photo_batches, monkeypatch):
    """The pipeline checks each float-graph rewrite against the model's outputs: quantize and the
    sensitivity analyzer (which measures against that graph) both refuse a broken one."""
    import fxq.pipeline

    def broken_equalize(gm, batches, on_output=None):  # an equalization that forgets to compensate in the consumer
        gm.get_submodule("mid.0")[0].weight.data.mul_(2.0)
        return []

    monkeypatch.setattr(fxq.pipeline, "equalize", broken_equalize)
    calibration, _ = photo_batches
    with pytest.raises(FxqError, match="after cross-layer equalization the float graph no longer computes"):
        sensitivity(planted_model(), calibration[0][:1], calibration_data=calibration, equalize=True)
    with pytest.raises(FxqError, match="after cross-layer equalization the float graph no longer computes"):
        fxq.quantize(planted_model(), calibration[0][:1], calibration_data=calibration)


def test_error_stats_match_known_noise():
    generator = torch.Generator().manual_seed(0)
    signal = torch.randn(4, 1000, generator=generator)
    noise = 0.01 * torch.randn(4, 1000, generator=generator)
    expected = 10 * math.log10(float(signal.square().sum() / noise.square().sum()))
    stats = ErrorStats()
    for part_signal, part_noise in zip(signal, noise):  # accumulated over parts = measured on the whole
        stats.update(part_signal, part_signal + part_noise)
    assert stats.sqnr_db == pytest.approx(expected, abs=1e-4)
    assert sqnr_db(signal, signal + noise) == pytest.approx(expected, abs=1e-4)
    assert stats.mse == pytest.approx(float(noise.square().mean()), rel=1e-4)
    assert stats.max_abs_error == pytest.approx(float(noise.abs().max()), rel=1e-6)
    assert stats.cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(
        signal.reshape(1, -1), (signal + noise).reshape(1, -1))), abs=1e-5)
    weight = torch.ones(4, 3, 3, 3)
    weight[2] *= 50
    weight[3] = 0  # dead channel: ignored
    assert channel_range_ratio(weight) == pytest.approx(50.0)


# --- real model ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def mobilenet_report(mobilenet, calibration_crops, eval_crops):
    # the first 16 of the shared crops are random_crops(16, seed=1) and random_crops(16, seed=2)
    calibration = list(calibration_crops[:16].split(8))
    evaluation = list(eval_crops[:16].split(8))
    report = sensitivity(mobilenet, calibration[0][:1], calibration_data=calibration, eval_data=evaluation)
    return mobilenet, evaluation, report


def test_mobilenet_lists_every_conv(mobilenet_report):
    model, _, report = mobilenet_report
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    assert len(convs) == 52
    rows = {layer.name: layer for layer in report.layers}
    assert set(convs) <= set(rows)
    assert [layer.name for layer in report.layers if layer.name in convs] == convs  # graph order
    table = str(report)
    for name in convs:
        assert f" {name} " in table
        assert rows[name].own_sqnr_db is not None and rows[name].solo_sqnr_db is not None
        # the refit moves weights off the float ones on purpose (features.14.conv.1.0: 24.9 dB, AVX2)
        assert rows[name].weight_sqnr_db > 20.0
    # the range ratio describes the weights the int8 model holds (after folding and equalization)
    int8_modules = dict(report.quantized.named_modules())
    for name in convs:  # the int8 grid's per-channel scales are proportional to each channel's max |w|
        scales = int8_modules[name].weight().q_per_channel_scales()
        assert rows[name].weight_range_ratio == pytest.approx(float(scales.max() / scales.min()), rel=1e-3)


def test_mobilenet_last_layer_accumulated_sqnr_matches_logits(mobilenet_report):
    model, evaluation, report = mobilenet_report
    with torch.no_grad(), using_engine(report.engine):
        float_logits = torch.cat([model(batch) for batch in evaluation])
        int8_logits = torch.cat([report.quantized(batch) for batch in evaluation])
    end_to_end = sqnr_db(float_logits, int8_logits)
    last = report.layers[-1]
    assert last.name == "classifier.1"
    assert last.sqnr_db == pytest.approx(end_to_end, abs=1.0)
    assert report.end_to_end_sqnr_db == pytest.approx(end_to_end, abs=1.0)
    # solo impacts add up (roughly, noise powers) to no less than the whole model's error
    solo_noise = sum(10 ** (-layer.solo_sqnr_db / 10) for layer in report.layers)
    assert 10 * math.log10(1 / solo_noise) < end_to_end + 6.0


@pytest.mark.slow
def test_mobilenet_recommendation_for_30_db_is_verified_on_fresh_images(mobilenet_report, eval_crops):
    """recommend(30) then quantize(keep_float=...) reaches 30 dB on the eval crops it was chosen on, and
    stays close on crops it never saw (about 5 minutes: each verification quantizes the model again)."""
    model, evaluation, report = mobilenet_report
    names = report.recommend(30.0)
    assert report.recommendation.verified_sqnr_db >= 30.0
    calibration = report._inputs.calibration_batches
    mixed = quantize(model, calibration[0], calibration_data=calibration, keep_float=names)
    unseen = eval_crops[16:48]
    with torch.no_grad(), using_engine(summary_of(mixed).engine):
        assert sqnr_db(torch.cat([model(b) for b in evaluation]), torch.cat([mixed(b) for b in evaluation])) >= 30.0
        assert sqnr_db(model(unseen), mixed(unseen)) >= 27.0
    assert any(is_quantized_module(module) for module in mixed.modules())


def test_report_repr_names_layers(mobilenet_report):
    _, _, report = mobilenet_report
    assert isinstance(report, SensitivityReport)
    assert "53 layers" in repr(report)
    with pytest.raises(KeyError, match="no quantized layer"):
        report["features.99"]


def test_float_units_group_layers_into_blocks_ranked_by_noise(planted_report):
    base = planted_report.layers[0]

    def row(name: str, solo_db: float):
        return dataclasses.replace(base, name=name, solo_sqnr_db=solo_db)

    layers = [row("features.0.0", 20.0), row("features.1.conv.0.0", 25.0), row("features.1.conv.1", 30.0),
              row("features.2.conv.0.0", 40.0), row("features.2.conv.1.0", 40.0), row("features.2.conv.2", 40.0),
              row("classifier.1", 35.0)] + [row(f"features.3.{i}", 50.0) for i in range(5)]
    units = float_units(layers)
    # blocks of 2..4 layers become units; lone layers and a 5-layer module stay layers
    assert [unit.name for unit in units] == ["features.0.0", "features.1", "classifier.1", "features.2"] + \
        [f"features.3.{i}" for i in range(5)]
    assert units[1].layers == ("features.1.conv.0.0", "features.1.conv.1")
    assert units[1].noise == pytest.approx(10 ** -2.5 + 10 ** -3.0)


def test_float_units_ranked_by_noise_per_microsecond_when_costs_are_given(planted_report):
    base = planted_report.layers[0]
    layers = [dataclasses.replace(base, name=name, solo_sqnr_db=solo_db)
              for name, solo_db in (("wide", 20.0), ("narrow", 23.0), ("free", 40.0))]
    by_noise = float_units(layers)
    assert [unit.name for unit in by_noise] == ["wide", "narrow", "free"]
    assert all(unit.cost_us is None for unit in by_noise)
    # wide removes 2x the noise of narrow at 10x the cost; a unit estimated faster in float counts as 10 us
    by_cost = float_units(layers, {"wide": 1000.0, "narrow": 100.0, "free": -50.0})
    assert [unit.name for unit in by_cost] == ["narrow", "wide", "free"]
    assert [unit.cost_us for unit in by_cost] == [100.0, 1000.0, -50.0]


class TwoResolutions(nn.Module):
    """stem -> `wide` block at 64x64 -> 4x4 average pool -> `narrow` block at 16x16 -> head.

    Both blocks carry planted weight outliers (see `Planted`); wide's are larger, so by solo noise alone it
    ranks first, but in float it costs several times narrow's time (16x the pixels; the layers' float
    and int8 times are measured, and with a 2x2 pool, 4x the pixels, they differed by only 2.2x here).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU())
        self.wide = nn.Sequential(nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()), nn.Conv2d(32, 32, 1))
        self.pool = nn.AvgPool2d(4)
        self.narrow = nn.Sequential(nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()), nn.Conv2d(32, 32, 1))
        self.head = nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.narrow(self.pool(self.wide(self.stem(x)))))


def two_resolutions_model() -> TwoResolutions:
    torch.manual_seed(0)
    model = TwoResolutions().eval()
    with torch.no_grad():
        for producer, consumer, outlier_scale in ((model.stem[0], model.wide[0][0], 2 * OUTLIER_SCALE),
                                                  (model.wide[1], model.narrow[0][0], OUTLIER_SCALE)):
            producer.weight[1], producer.bias[1] = producer.weight[0], producer.bias[0]
            big = outlier_scale * consumer.weight.abs().max()
            consumer.weight[:, 0, 1, 1], consumer.weight[:, 1, 1, 1] = big, -big
    return model


def test_recommend_prefers_the_block_that_costs_less_latency_per_noise_removed(photo_batches, monkeypatch):
    from fxq.analysis import sensitivity as sensitivity_module

    # costs as timed on an Intel Xeon (VNNI), not on this machine: timed under load, narrow once came out
    # at -40 us and failed the test; timings belong in bench/ (bench/experiments/island_costs.py)
    timed = {"narrow": 44.0, "wide": 380.0}
    table_costs = sensitivity_module.float_unit_costs
    monkeypatch.setattr(sensitivity_module, "float_unit_costs", lambda *args, **kwargs: {
        name: timed.get(name, cost) for name, cost in table_costs(*args, **kwargs).items()})
    calibration, evaluation = photo_batches
    report = sensitivity(two_resolutions_model(), calibration[0][:1], calibration_data=calibration,
                         eval_data=evaluation, equalize=False)
    by_noise = [unit.name for unit in float_units([layer for layer in report.layers])]
    assert by_noise.index("wide") < by_noise.index("narrow")  # the old ranking would keep wide float first
    units = {unit.name: unit for unit in report.float_units()}
    assert (units["narrow"].cost_us, units["wide"].cost_us) == (44.0, 380.0)
    ranked = list(units)
    assert ranked.index("narrow") < ranked.index("wide")
    # keeping either block float reaches the target; the cheaper one is chosen. Measured (Intel Xeon, VNNI):
    # all int8 39.5 dB, narrow float 42.5 dB, wide float 42.2 dB
    # (the 1x1 head, measured faster in float, may be ranked before narrow and is then left out again)
    target = report.end_to_end_sqnr_db + 0.4
    kept = report.recommend(target)
    assert "narrow" in kept and "wide" not in kept, kept
    recommendation = report.recommendation
    assert recommendation.verified_sqnr_db >= target
    assert recommendation.float_cost_us < units["wide"].cost_us
    assert recommendation.to_dict()["float_cost_us"] == pytest.approx(recommendation.float_cost_us, abs=0.1)


def test_metric_target_keeps_the_planted_layer_float(photo_batches, planted_report):
    from fxq.mixed_precision import quantize_to_metric

    calibration, evaluation = photo_batches
    model = planted_model()
    with torch.no_grad():
        references = [model(batch) for batch in evaluation]

    def negative_noise(candidate: nn.Module) -> float:  # higher is better; the float model scores 0
        with torch.no_grad():
            noise = sum(float((reference - candidate(batch)).pow(2).sum()) for reference, batch in
                        zip(references, evaluation))
        return -noise / sum(float(reference.pow(2).sum()) for reference in references)

    max_drop = 10 ** (-(planted_report.end_to_end_sqnr_db + 10.0) / 10)
    quantized = quantize_to_metric(model, (calibration[0][:1],), [(b,) for b in calibration], negative_noise,
                                   max_drop, QuantOptions(**PLANTED_OPTIONS))
    assert -negative_noise(quantized) <= max_drop
    summary = summary_of(quantized)
    kept = [name for name, why in summary.float_layers if "eval_fn" in why]
    assert kept and all(name.startswith("mid.0") for name in kept)  # the fused container's conv
    assert any(note.startswith("eval_fn: float ") and "1 block(s)" in note for note in summary.notes), summary.notes
    with pytest.raises(ConfigError, match="max_drop"):  # only the user's own float model scores well
        quantize_to_metric(model, (calibration[0][:1],), [(b,) for b in calibration],
                           lambda m: 0.0 if isinstance(m, Planted) else -1.0, 0.5, QuantOptions(equalize=False))


def test_quantize_with_eval_fn_and_max_drop(photo_batches):
    calibration, evaluation = photo_batches
    model = planted_model()
    with torch.no_grad():
        reference = model(evaluation[0])

    def closeness(candidate: nn.Module) -> float:  # the user's metric: higher is better, float scores inf
        with torch.no_grad():
            return sqnr_db(reference, candidate(evaluation[0]))

    all_int8 = closeness(quantize(model, calibration[0][:1], calibration_data=calibration, equalize=False))
    # a drop of (inf - x) is inf for any int8 model: the metric below caps at 60 instead
    quantized = quantize(model, calibration[0][:1], calibration_data=calibration, equalize=False,
                         eval_fn=lambda m: min(closeness(m), 60.0), max_drop=60.0 - (all_int8 + 10.0))
    assert closeness(quantized) >= all_int8 + 10.0
    summary = summary_of(quantized)
    assert any("eval_fn" in why for _, why in summary.float_layers)
    assert summary.options["eval_fn"] == "<lambda>" and summary.options["max_drop"] > 0


def test_held_out_split_keeps_the_last_quarter_for_verification():
    from fxq.mixed_precision import held_out_split

    batches = [(torch.full((1,), float(index)),) for index in range(8)]
    fit, held_out = held_out_split(batches)
    assert fit == batches[:6] and held_out == batches[6:]
    assert held_out_split(batches[:3]) == (batches[:2], batches[2:3])
    only = batches[:1]
    assert held_out_split(only) == (only, only)


def test_quantize_to_target_verifies_on_held_out_batches_and_calibrates_on_all(photo_batches):
    calibration, evaluation = photo_batches
    batches = list(torch.cat(calibration).split(4))  # 4 batches: 3 to calibrate the trials, 1 to verify
    model = planted_model()
    quantized = quantize(model, calibration[0][:1], calibration_data=batches, target_sqnr_db=30.0,
                         **PLANTED_OPTIONS)
    summary = summary_of(quantized)
    (note,) = [note for note in summary.notes if note.startswith("target_sqnr_db=30")]
    assert "on 1 held-out calibration batch(es), calibrated on the other 3" in note
    assert "mid.0" in summary.options["keep_float"]
    assert not is_quantized_module(quantized.get_submodule("mid.0"))
    # the returned model was calibrated on all four batches: its ranges cover the held-out batch too
    stats = ErrorStats()
    with torch.no_grad():
        for batch in evaluation:
            stats.update(model(batch), quantized(batch))
    assert stats.sqnr_db > 27.0


class DroppedPath(nn.Module):
    """A residual block whose branch ends in torchvision's StochasticDepth (an identity in eval mode, which
    fxq.quantize drops before equalizing: the branch's last conv then joins the residual stream's group)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 16, 1), StochasticDepth(0.2, "row"))
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(torch.relu(y + self.branch(y)))


def test_sensitivity_mirrors_the_graph_quantize_works_on(photo_batches):
    """The float reference is traced and opened up as fxq.quantize's graph is (eval-mode identities
    dropped), so its equalization matches the int8 model's; before, EfficientNet-B0 failed the
    reference's weight-grid check at its first block with stochastic depth."""
    calibration, evaluation = photo_batches
    torch.manual_seed(0)
    report = sensitivity(DroppedPath().eval(), calibration[0][:1], calibration_data=calibration,
                         eval_data=evaluation)
    assert {"stem.0", "branch.0", "branch.2"} <= {layer.name for layer in report.layers}
    assert report.end_to_end_sqnr_db > 25.0


def test_a_verification_quantizes_the_kept_float_graph_to_the_same_model(photo_batches):
    """recommend's verifications quantize a copy of the analyzer's float graph instead of tracing, folding
    and equalizing again: the result must equal quantizing from scratch with the same float layers."""
    from fxq.pipeline import quantize_model

    calibration, evaluation = photo_batches
    batches = [(batch,) for batch in calibration]
    options = QuantOptions(dynamic_where_faster=False)
    kept = quantize_model(planted_model(), batches[0], batches, options, keep_float_graph=True).float_graph
    floats = options.with_float(["mid"])
    reused = quantize_model(planted_model(), batches[0], batches, floats, float_graph=kept).model
    fresh = quantize_model(planted_model(), batches[0], batches, floats).model
    with using_engine(summary_of(fresh).engine), torch.no_grad():
        assert torch.equal(reused(evaluation[0]), fresh(evaluation[0]))
    assert [name for name, _ in summary_of(reused).float_layers] == ["mid.0"]


class IllConditioned(nn.Module):
    """Outputs that float rounding alone scrambles (sin of a huge multiple), as a random-weight LeViT's are:
    folding the BatchNorm changes rounding only, yet moves them far below any fixed SQNR bound."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(1e5 * self.bn(self.conv(x)))


def test_rewrites_of_an_ill_conditioned_model_are_checked_against_its_float_noise(photo_batches):
    torch.manual_seed(0)
    model = IllConditioned().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    calibration, _ = photo_batches
    quantized = quantize(model, calibration[0][:2], calibration_data=calibration, equalize=False)
    summary = summary_of(quantized)
    assert any("fold_batchnorm" in line for line in summary.rewrites)
    assert any("checked against the model's own float noise" in line for line in summary.rewrites)
