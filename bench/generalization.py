"""Accuracy only, on models other than MobileNetV2: PyTorch's FX default against fxq's default, side by side.

    python -m bench.generalization [--models resnet18 resnet50 ...] [--calibration 64 --eval 256] [--markdown]

The issue's goal says the method must generalize beyond MobileNetV2. torchvision's other models have no
trained weights offline, so these are bench/suite.py's random-weight models with BatchNorm statistics
taken from crops (suite.reestimate_batchnorm); bench/trained.py has trained models from other packages.
Per model: logits SQNR (over the whole set, and the median crop's own), top-1 agreement with the float
model on the evaluation crops (seed 2), both flows calibrated on the same crops (seed 1), and quantize
wall time. The default counts are the issue's protocol, 64 and 256; figures before 2026-12-06 were taken
with 32 and 64, and the count matters: on EfficientNet-B0 (64 evaluation crops) fxq gave 2.65 dB
calibrated on 32 crops and 9.72 on 128 (PyTorch's FX default 5.23 and 3.81). No latency is measured, so
this may run beside other jobs (bench/suite.py times them). Random weights spread logits less than
trained ones, so top-1 agreement moves by several points between runs that differ by 0.1 dB.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see bench/suite.py)

import argparse
import time
import warnings
from typing import Iterator

import torch
from tabulate import tabulate

import fxq
from bench.protocol import (NATIVE_ENGINE, calibration_batches, evaluation_crops, native_fx_default,
                            outputs_in_batches, sqnr_db, top1_agreement)
from bench.suite import build_float_model
from fxq.backend.engine import using_engine
from fxq.report.latency import cpu_name, isa_limits
from fxq.samples import random_crops

warnings.filterwarnings("ignore")

MODELS = ("resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0")


def median_crop_sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    """The median over crops of each crop's own logits SQNR.

    The SQNR over the whole set weighs crops by their logits' energy, and a random-weight model can give
    one crop logits far beyond the rest: on EfficientNet-B0 (64 calibration and 256 evaluation crops) one
    crop's logits norm was 459 where the median crop's was 2.1, and 5 crops made 98.5% of fxq's error; fxq
    gave 2.07 dB over the set and a 6.34 dB median crop, PyTorch's FX default 3.23 and -2.72.
    """
    return float(torch.tensor([sqnr_db(crop, crop_output) for crop, crop_output in zip(reference, output)]).median())


def fxq_with_engine(model: torch.nn.Module, calibration: list[torch.Tensor]) -> tuple[torch.nn.Module, str]:
    quantized = fxq.quantize(model, (calibration[0][:1],), calibration_data=calibration)
    return quantized, fxq.summary_of(quantized).engine


def quantized_side_by_side(model: torch.nn.Module, calibration: list[torch.Tensor],
                           native_model: torch.nn.Module | None = None
                           ) -> Iterator[tuple[torch.nn.Module, str, float]]:
    """PyTorch's FX default (on `native_model`, default `model`), then fxq's default, calibrated on the same
    batches: each int8 model, the engine to run it on (the one it was converted for) and quantize seconds."""
    for quantize in (lambda: (native_fx_default(native_model or model, calibration), NATIVE_ENGINE),
                     lambda: fxq_with_engine(model, calibration)):
        start = time.perf_counter()
        quantized, engine = quantize()
        yield quantized, engine, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--calibration", type=int, default=64, help="calibration crops (seed 1)")
    parser.add_argument("--eval", type=int, default=256, help="evaluation crops (seed 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    batchnorm_crops = random_crops(32, seed=100)
    calibration = calibration_batches(args.calibration)
    evaluation = evaluation_crops(args.eval)
    rows = []
    for name in args.models:
        model, weights = build_float_model(name, batchnorm_crops)
        reference = outputs_in_batches(model, evaluation)
        row = [name, weights]
        for quantized, engine, seconds in quantized_side_by_side(model, calibration):
            with using_engine(engine):
                output = outputs_in_batches(quantized, evaluation)
            agreement = top1_agreement(reference, output)
            row += [round(sqnr_db(reference, output), 2), round(median_crop_sqnr_db(reference, output), 2),
                    f"{100 * agreement:.1f}%", round(seconds, 1)]
        rows.append(row)
        print(*row, sep=" | ", flush=True)
    print(f"\nCPU {cpu_name()}{isa_limits()}, threads={torch.get_num_threads()}, torch {torch.__version__}, "
          f"{args.calibration} calibration and {args.eval} evaluation crops")
    headers = ["model", "weights"] + [f"{flow} {column}" for flow in ("native FX", "fxq") for column in (
        "SQNR dB", "median crop SQNR dB", "agreement", "quantize s")]
    print(tabulate(rows, headers, tablefmt="github" if args.markdown else "simple"))


if __name__ == "__main__":
    main()
