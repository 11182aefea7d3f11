"""Core acceptance figures for resnet18: int8 kernels, serialized size and batch-1 latency vs float eager.

Float and int8 are timed alternately in one run (fxq.report), 2 threads by default.

    python bench/core_resnet18.py [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
import torchvision

import fxq
from fxq.report.latency import cpu_name
from fxq.samples import random_crops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    calibration = list(random_crops(32, seed=1).split(16))
    example = calibration[0][:1]
    quantized = fxq.quantize(model, (example,), calibration_data=calibration)
    result = fxq.report(model, quantized, (example,), eval_data=[random_crops(32, seed=2)],
                        batch_sizes=(1, 32), threads=args.threads)
    print(f"resnet18 (random init), CPU {cpu_name()}, threads {args.threads}, "
          f"torch {torch.__version__}")
    print(result)


if __name__ == "__main__":
    main()
