"""Accuracy only, on models other than MobileNetV2: PyTorch's FX default against fxq's default, side by side.

    python bench/generalization.py [--models resnet18 resnet50 ...] [--markdown]

The issue's goal says the method must generalize beyond MobileNetV2; only MobileNetV2 has trained weights
offline, so the others are bench/suite.py's random-weight models with BatchNorm statistics taken from
crops (suite.reestimate_batchnorm). Per model: logits SQNR and top-1 agreement with the float model on 64
evaluation crops, both flows calibrated on the same 32 crops, and quantize wall time. No latency is
measured, so this may run beside other jobs (bench/suite.py times them). Random weights spread logits
less than trained ones, so top-1 agreement moves by several points between runs that differ by 0.1 dB.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see bench/suite.py)

import argparse
import time
import warnings

import torch
from tabulate import tabulate

import fxq
from accuracy import sqnr_db
from fxq.backend.engine import using_engine
from fxq.report.latency import cpu_name, isa_limits
from fxq.samples import random_crops
from suite import DATA_BATCH, NATIVE_ENGINE, build_float_model, quantize_native_fx

warnings.filterwarnings("ignore")

MODELS = ("resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0")


def logits(model: torch.nn.Module, crops: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(chunk) for chunk in crops.split(DATA_BATCH)])


def fxq_with_engine(model: torch.nn.Module, calibration: list[torch.Tensor]) -> tuple[torch.nn.Module, str]:
    quantized = fxq.quantize(model, (calibration[0][:1],), calibration_data=calibration)
    return quantized, fxq.summary_of(quantized).engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    batchnorm_crops = random_crops(32, seed=100)
    calibration = list(random_crops(32, seed=1).split(DATA_BATCH))
    evaluation = random_crops(64, seed=2)
    rows = []
    for name in args.models:
        model, weights = build_float_model(name, batchnorm_crops)
        reference = logits(model, evaluation)
        row = [name, weights]
        for quantize in (lambda: (quantize_native_fx(model, calibration), NATIVE_ENGINE),
                         lambda: fxq_with_engine(model, calibration)):
            start = time.perf_counter()
            quantized, engine = quantize()
            seconds = time.perf_counter() - start
            with using_engine(engine):  # each int8 model runs on the engine it was converted for
                output = logits(quantized, evaluation)
            agreement = float((output.argmax(1) == reference.argmax(1)).float().mean())
            row += [round(sqnr_db(reference, output), 2), f"{100 * agreement:.1f}%", round(seconds, 1)]
        rows.append(row)
        print(*row, sep=" | ", flush=True)
    print(f"\nCPU {cpu_name()}{isa_limits()}, threads={torch.get_num_threads()}, torch {torch.__version__}")
    headers = ["model", "weights", "native FX SQNR dB", "native FX agreement", "native FX quantize s",
               "fxq SQNR dB", "fxq agreement", "fxq quantize s"]
    print(tabulate(rows, headers, tablefmt="github" if args.markdown else "simple"))


if __name__ == "__main__":
    main()
