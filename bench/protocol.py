"""The measurement protocol the benches share: crops, PyTorch's FX default baseline and the metrics.

Crops are fxq.samples.random_crops of the scikit-image photographs, calibration from seed 1 and evaluation
from seed 2 (disjoint draws), fed in batches of 16. SQNR is fxq.analysis.metrics', the number fxq's own
report prints. The baseline is the flow PyTorch users get today: prepare_fx/convert_fx with
get_default_qconfig_mapping('x86').
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from bench.models import build
from fxq.analysis.metrics import ErrorStats, sqnr_db
from fxq.backend.engine import using_engine
from fxq.calibration import output_tensors
from fxq.report.latency import measure_latency
from fxq.samples import pretrained_mobilenet_v2, random_crops

__all__ = ["CALIBRATION_SEED", "EVAL_SEED", "DATA_BATCH", "NATIVE_ENGINE", "calibration_batches", "evaluation_crops",
           "native_fx_default", "mobilenet_protocol", "batch1_latency_ratio", "outputs_in_batches", "top1_agreement",
           "sqnr_db", "outputs_sqnr_db"]

CALIBRATION_SEED, EVAL_SEED = 1, 2
DATA_BATCH = 16  # calibration and evaluation crops are fed in batches of this size
NATIVE_ENGINE = "x86"


def calibration_batches(count: int, seed: int = CALIBRATION_SEED, size: int = 224) -> list[torch.Tensor]:
    """`count` calibration crops in batches of DATA_BATCH."""
    return list(random_crops(count, seed=seed, size=size).split(DATA_BATCH))


def evaluation_crops(count: int, seed: int = EVAL_SEED, size: int = 224) -> torch.Tensor:
    return random_crops(count, seed=seed, size=size)


def native_fx_default(model: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """PyTorch's own FX flow on a copy of `model`: default NATIVE_ENGINE qconfig mapping, prepare_fx's default
    fusion (conv+bn+relu), calibration, convert_fx. Run the result under using_engine(NATIVE_ENGINE)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with using_engine(NATIVE_ENGINE):
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(NATIVE_ENGINE),
                              (calibration[0][:1],))
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
        return convert_fx(prepared)


def outputs_in_batches(model: nn.Module, inputs: torch.Tensor, batch_size: int = DATA_BATCH) -> torch.Tensor:
    """The model's (single tensor) output over `inputs`, run `batch_size` at a time. The batch size is part
    of the protocol: fxq's dynamic int8 head quantizes its input on each call's range."""
    with torch.no_grad():
        return torch.cat([model(chunk) for chunk in inputs.split(batch_size)])


def mobilenet_protocol(calibration_seed: int = CALIBRATION_SEED, eval_seed: int = EVAL_SEED, eval_crops: int = 256
                       ) -> tuple[nn.Module, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The accuracy issue's protocol: (float ImageNet MobileNetV2, 64 calibration crops in batches of 16,
    evaluation crops, float logits on them computed 32 at a time)."""
    model = pretrained_mobilenet_v2()
    calibration = calibration_batches(64, seed=calibration_seed)
    evaluation = evaluation_crops(eval_crops, seed=eval_seed)
    return model, calibration, evaluation, outputs_in_batches(model, evaluation, 32)


def batch1_latency_ratio(float_model: nn.Module, int8_model: nn.Module, example: torch.Tensor) -> float:
    """Median int8 / float batch-1 latency, the two timed alternately after warm-up."""
    (row,) = measure_latency(float_model, int8_model, (example,), batch_sizes=(1,), repeats=30)
    return row.int8_median_ms / row.float_median_ms


def top1_agreement(reference: torch.Tensor, output: torch.Tensor) -> float:
    """Share of rows whose argmax (class, decision) is the same in both."""
    return float((output.argmax(1) == reference.argmax(1)).float().mean())


def outputs_sqnr_db(output_pairs: Iterable[tuple[Any, Any]]) -> float:
    """SQNR (dB) of all the tensors of the test outputs against the reference outputs, over every
    (reference output, test output) pair: tuples, lists and dicts of tensors count as their tensors."""
    stats = ErrorStats()
    for reference, test in output_pairs:
        for reference_tensor, test_tensor in zip(output_tensors(reference), output_tensors(test), strict=True):
            stats.update(reference_tensor, test_tensor)
    return stats.sqnr_db


def model_and_crops(name: str, calibration_count: int, eval_count: int
                    ) -> tuple[nn.Module, list[torch.Tensor], torch.Tensor, torch.Tensor, str]:
    """(float model, calibration batches, evaluation crops, float logits 32 at a time, weights label)."""
    if name == "mobilenet_v2":
        model, _, evaluation, reference = mobilenet_protocol(eval_crops=eval_count)
        return model, calibration_batches(calibration_count), evaluation, reference, "ImageNet weights"
    model = build(name, size=224)
    evaluation = evaluation_crops(eval_count)
    return (model, calibration_batches(calibration_count), evaluation, outputs_in_batches(model, evaluation, 32),
            "random weights, BatchNorm statistics from crops")
