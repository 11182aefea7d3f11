"""The same model, data and options give the same int8 model, bit for bit.

Checked within a process, in a fresh process with another hash seed (set iteration order changes), and
after save/load whatever int8 engine is current while loading. The model is the first blocks of the real
ImageNet MobileNetV2 on real photographs, so the default pipeline does everything it does on full models:
BN folding, ReLU6 fusion, equalization, optimized rounding, bias correction and the engine choice.

Bit-identical means with the same number of threads: another thread count changes float sums in their
last bits, and that moves a few int8 weights (measured: 9 of 23936 weights, outputs 40 dB apart).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fxq
from fxq.backend.engine import available_engines
from fxq.backend.op_kinds import is_weighted_quantized_module
from helpers import differing_entries, photo_batches, small_mobilenet, sqnr

# Measured with the default pipeline on this model and these crops: 24.6 dB (seed 0 and seed 7 alike).
SQNR_FLOOR_DB = 20.0


def quantize(model: nn.Module, calibration: list[torch.Tensor], **options) -> nn.Module:
    return fxq.quantize(model, calibration[0][:1], calibration_data=calibration, **options)


@pytest.fixture(scope="module")
def data() -> tuple[list[torch.Tensor], torch.Tensor]:
    return photo_batches()


@pytest.fixture(scope="module")
def model(mobilenet) -> nn.Module:
    return small_mobilenet(mobilenet)


@pytest.fixture(scope="module")
def int8_model(model, data) -> nn.Module:
    return quantize(model, data[0])


@pytest.fixture
def restore_engine():
    """fxq.quantize and fxq.load set the global int8 engine on purpose; put the caller's back afterwards."""
    previous = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = previous


def test_two_runs_give_a_bit_identical_int8_model(model, data, int8_model):
    calibration, evaluation = data
    summary = fxq.summary_of(int8_model)
    # the whole default pipeline ran, so each step's determinism is covered
    assert summary.rewrites and summary.equalized_pairs > 0
    assert summary.rounded_layers > 0 and summary.bias_corrected_layers > 0
    again = quantize(model, calibration)
    # 13 conv/linear layers; a cost model may keep a few float (listed in the summary): most must be int8
    assert sum(map(is_weighted_quantized_module, int8_model.modules())) >= 10
    assert differing_entries(int8_model.state_dict(), again.state_dict()) == []
    with torch.no_grad():
        assert torch.equal(int8_model(evaluation), again(evaluation))
    assert dataclasses.replace(summary, timings_s={}) == dataclasses.replace(fxq.summary_of(again), timings_s={})


def test_a_fresh_process_gives_the_same_int8_model(int8_model, tmp_path):
    saved = tmp_path / "state.pt"
    environment = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run([sys.executable, __file__, str(saved), str(torch.get_num_threads())],
                            capture_output=True, text=True, timeout=300, env=environment,
                            cwd=Path(__file__).resolve().parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert differing_entries(int8_model.state_dict(), torch.load(saved, weights_only=False)) == []


def test_another_seed_gives_a_working_model_and_leaves_the_callers_rng_alone(model, data):
    calibration, evaluation = data
    torch.manual_seed(1234)
    caller_state = torch.get_rng_state()
    reseeded = quantize(model, calibration, seed=7)
    assert torch.equal(torch.get_rng_state(), caller_state)
    assert fxq.summary_of(reseeded).options["seed"] == 7
    with torch.no_grad():
        assert sqnr(model(evaluation), reseeded(evaluation)) > SQNR_FLOOR_DB


@pytest.mark.parametrize("current_engine", available_engines())
def test_reload_is_bit_identical_whatever_engine_is_current(int8_model, data, tmp_path, restore_engine,
                                                            current_engine):
    """Loading packs int8 weights for the current engine; fxq.load must pack them for the model's own."""
    evaluation = data[1]
    engine = fxq.summary_of(int8_model).engine
    torch.backends.quantized.engine = engine
    with torch.no_grad():
        expected = int8_model(evaluation)
    path = fxq.save(int8_model, tmp_path / "model.pt")
    torch.backends.quantized.engine = current_engine
    loaded = fxq.load(path)
    assert torch.backends.quantized.engine == engine
    with torch.no_grad():
        assert torch.equal(loaded(evaluation), expected)


if __name__ == "__main__":  # the fresh process of test_a_fresh_process_gives_the_same_int8_model
    from fxq.samples import pretrained_mobilenet_v2

    torch.set_num_threads(int(sys.argv[2]))
    calibration_batches, _ = photo_batches()
    fresh = quantize(small_mobilenet(pretrained_mobilenet_v2()), calibration_batches)
    torch.save(fresh.state_dict(), sys.argv[1])
