"""fxq.report: float vs int8 size, latency, error and structure, with numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fxq
from fxq.report import report
from tests.cli_models import tiny, two_heads


def _batches(seed: int, count: int = 2, size: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, size, size, generator=generator) for _ in range(count)]


@pytest.fixture(scope="module")
def tiny_report():
    model = tiny()
    calibration = _batches(1)
    quantized = fxq.quantize(model, calibration[0][:1], calibration_data=calibration)
    return report(model, quantized, calibration[0][:1], eval_data=_batches(2), batch_sizes=(1, 2), threads=1)


def test_int8_is_smaller(tiny_report):
    size = tiny_report.size
    assert size.float_parameters == sum(p.numel() for p in tiny().parameters())
    assert size.int8_mb < size.float_mb
    assert size.ratio < 0.5


def test_error_metrics(tiny_report):
    error = tiny_report.error
    assert math.isfinite(error.sqnr_db) and error.sqnr_db > 15
    assert 0.99 < error.cosine <= 1.0
    assert error.max_abs_error > 0
    assert error.top1_agreement is not None and 0.0 <= error.top1_agreement <= 1.0
    assert error.samples == 8


def test_structure(tiny_report):
    structure = tiny_report.structure
    assert structure.int8_modules > 0
    assert structure.float_weight_layers == []
    assert structure.engine in torch.backends.quantized.supported_engines
    assert isinstance(structure.reduce_range, bool)
    assert any(p.startswith("conv-relu") for p in structure.patterns)


def test_latency_rows_and_threads_restored(tiny_report):
    assert [row.batch_size for row in tiny_report.latency] == [1, 2]
    assert all(row.threads == 1 and row.float_median_ms > 0 and row.int8_p90_ms >= row.int8_median_ms
               for row in tiny_report.latency)


def test_renderings(tiny_report):
    data = json.loads(tiny_report.to_json())
    assert data == json.loads(json.dumps(tiny_report.to_dict()))
    assert data["size"]["ratio"] < 0.5 and data["structure"]["int8_modules"] > 0
    markdown = tiny_report.to_markdown()
    assert "|" in markdown and "SQNR dB" in markdown
    text = str(tiny_report)
    assert "serialized MB" in text and "int8 modules" in text
    # the per-activation range choices (activation_observer="auto"), counted by rule
    counts = tiny_report.structure.range_choices
    assert counts and "activation ranges chosen" in text
    assert sum(int(part.split()[-1]) for part in text.split("activation ranges chosen")[1].splitlines()[0]
               .strip(" |").split(", ")) == len(counts)


def test_threads_setting_is_restored():
    model = tiny()
    quantized = fxq.quantize(model, torch.randn(1, 3, 16, 16), calibration_data=_batches(1, 1, 16))
    before = torch.get_num_threads()
    report(model, quantized, torch.randn(1, 3, 16, 16), threads=1)
    assert torch.get_num_threads() == before


def test_dict_outputs_and_identical_models():
    model = two_heads()
    inputs = torch.randn(2, 3, 16, 16)
    same = report(model, model, inputs)  # a float model against itself: no error at all
    assert same.error.sqnr_db == math.inf and same.error.max_abs_error == 0
    assert same.error.top1_agreement is None  # dict output: no single logits tensor
    assert same.structure.int8_modules == 0 and same.structure.engine is None
    assert len(same.structure.float_weight_layers) == 3
    json.loads(same.to_json())


def test_the_size_table_prints_parameter_counts_as_written(tiny_report):
    count = f"{tiny_report.size.float_parameters:,}"
    assert count in str(tiny_report)  # not re-parsed into scientific notation


def test_a_summary_prints_as_lines_a_user_can_read():
    model = tiny()
    calibration = _batches(1)
    text = str(fxq.summary_of(fxq.quantize(model, calibration[0][:1], calibration_data=calibration,
                                           keep_float=["2"])))
    assert text.startswith("engine ") and "biases corrected" in text and "steps (s): trace" in text
    assert "float layer 2: keep_float" in text


@pytest.mark.parametrize("count,warned", [(2, True), (8, False)])
def test_the_summary_says_when_calibration_had_few_samples(count, warned):
    """Batches of 4: 8 samples get the note, 32 do not."""
    model = tiny().eval()
    batches = _batches(0, count)
    summary = fxq.summary_of(fxq.quantize(model, batches[0][:1], calibration_data=batches))
    notes = [note for note in summary.notes if note.startswith("calibrated on")]
    assert [note.split(":")[0] for note in notes] == (["calibrated on 8 sample(s)"] if warned else [])


def test_progress_shows_each_step_with_its_time(capsys):
    """progress=True (the CLI's default) prints a line per pipeline step while it runs."""
    calibration = _batches(1)
    quantized = fxq.quantize(tiny(), calibration[0][:1], calibration_data=calibration, progress=True)
    shown = capsys.readouterr().err
    for step in fxq.summary_of(quantized).timings_s:
        if step not in ("dynamic_engine", "shared_inputs", "serving"):  # the api's steps, after the pipeline's
            assert f"fxq {step}" in shown, step
