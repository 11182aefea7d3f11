"""Batch-1 latency of fxq's int8 model against PyTorch's own FX int8 model, timed round-robin in one process.

bench/accuracy.py times each flow against float in its own run, so two int8 rows differ by the machine's
drift as well as by their kernels. Here float eager, PyTorch's FX default int8 (x86 qconfig mapping, the
baseline the accuracy issue names) and fxq's default int8 run one after the other in every round;
medians after warm-up, ratios against float and fxq against native. OpenMP's wait policy is left as it is
(OMP_WAIT_POLICY=PASSIVE, which bench/suite.py sets for shared machines, made every flow here slower:
float MobileNetV2 27 ms instead of 11 ms on an AMD EPYC).

    python -m bench.experiments.int8_latency [--models mobilenet_v2 resnet18] [--rounds 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torchvision
from tabulate import tabulate

import fxq
from bench.protocol import calibration_batches, native_fx_default
from fxq.backend.conv_add import fused_layers
from fxq.report.latency import cpu_name, isa_limits
from fxq.samples import pretrained_mobilenet_v2

warnings.filterwarnings("ignore")


def build(name: str) -> torch.nn.Module:
    if name == "mobilenet_v2":
        return pretrained_mobilenet_v2()
    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval()  # random weights: latency does not depend on them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    calibration = calibration_batches(32)
    example = calibration[0][:1]
    rows = []
    for name in args.models:
        model = build(name)
        flows = {"float": model, "PyTorch FX int8": native_fx_default(model, calibration),
                 "fxq int8": fxq.quantize(model, (example,), calibration_data=calibration)}
        times = {flow: [] for flow in flows}
        with torch.inference_mode():
            for round_ in range(args.warmup + args.rounds):
                for flow, runnable in flows.items():
                    start = time.perf_counter()
                    runnable(example)
                    if round_ >= args.warmup:
                        times[flow].append(time.perf_counter() - start)
        median = {flow: 1000 * statistics.median(values) for flow, values in times.items()}
        summary = fxq.summary_of(flows["fxq int8"])
        fused = len(fused_layers(flows["fxq int8"]))
        rows.append([name, f"{median['float']:.2f}", f"{median['PyTorch FX int8']:.2f}", f"{median['fxq int8']:.2f}",
                     f"{median['PyTorch FX int8'] / median['float']:.2f}", f"{median['fxq int8'] / median['float']:.2f}",
                     f"{median['fxq int8'] / median['PyTorch FX int8']:.2f}", f"{summary.engine}, {fused} conv-add"])
        print(rows[-1], flush=True)
    print(f"\nbatch 1, {args.rounds} rounds after {args.warmup} warm-up, medians; CPU: {cpu_name()}{isa_limits()}, "
          f"threads={torch.get_num_threads()}, torch {torch.__version__}")
    print(tabulate(rows, headers=["model", "float ms", "PyTorch FX int8 ms", "fxq int8 ms", "PyTorch FX / float",
                                  "fxq / float", "fxq / PyTorch FX", "fxq engine"], tablefmt="github"))


if __name__ == "__main__":
    main()
