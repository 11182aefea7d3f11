"""Time fxq.sensitivity on ImageNet MobileNetV2 (52 convs + classifier) with 32 calibration and 32 eval images.

    python -m bench.experiments.bench_sensitivity [--images 32] [--batch 8] [--repeat 1] [--threads N]
        [--option NAME=VALUE, a quantize option, e.g. optimize_rounding=False]

Prints the machine (CPU model, torch threads, load), the wall time and CPU time of each step, and the
end-to-end SQNR, so runs on other machines or commits can be compared. On a machine shared with other
jobs, run with OMP_WAIT_POLICY=PASSIVE (or --threads 1): OpenMP threads that busy-wait at every barrier
while a competing process holds the other core make 2-thread runs 5-10x slower (measured: 242 s instead
of 28 s for this benchmark at load average 3.5).
"""

from __future__ import annotations

import argparse
import ast
import os
import time

import torch

from fxq import samples
from fxq.analysis.sensitivity import sensitivity
from fxq.report.latency import cpu_name
from fxq.summary import summary_of


def float_forward_seconds(model: torch.nn.Module, batches: list[torch.Tensor], repeat: int = 3) -> float:
    """Best of `repeat` timings of the float model over the batches (the unit the analysis costs are in)."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeat):
            start = time.perf_counter()
            for batch in batches:
                model(batch)
            best = min(best, time.perf_counter() - start)
    return best


def parse_option(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="calibration images and eval images (each)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--option", action="append", default=[], help="quantize option NAME=VALUE")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    options = dict(parse_option(text) for text in args.option)

    print(f"cpu: {cpu_name()} ({os.cpu_count()} logical cores), torch {torch.__version__}, "
          f"torch.get_num_threads()={torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average {os.getloadavg()[0]:.2f}")
    model = samples.pretrained_mobilenet_v2()
    calibration = list(samples.random_crops(args.images, seed=1).split(args.batch))
    evaluation = list(samples.random_crops(args.images, seed=2).split(args.batch))
    print(f"MobileNetV2, {args.images} calibration + {args.images} eval images in batches of {args.batch}, "
          f"options {options or 'default'}")
    for run in range(args.repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        report = sensitivity(model, calibration[0][:1], calibration_data=calibration, eval_data=evaluation,
                             **options)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        steps = ", ".join(f"{name} {seconds:.1f}" for name, seconds in report.timings_s.items())
        quantize_steps = ", ".join(f"{name} {seconds:.1f}" for name, seconds in
                                   summary_of(report.quantized).timings_s.items())
        print(f"run {run + 1}: {wall:.1f} s wall, {cpu:.1f} s CPU ({cpu / torch.get_num_threads():.1f} s per "
              f"thread); steps (s): {steps}; {len(report.layers)} layers, end-to-end SQNR "
              f"{report.end_to_end_sqnr_db:.1f} dB; load average now {os.getloadavg()[0]:.2f}")
        print(f"  inside quantize (s): {quantize_steps}")
        forward = float_forward_seconds(model, evaluation)
        print(f"  one float forward of the eval images now takes {forward:.2f} s: side by side = "
              f"{report.timings_s['side_by_side'] / forward:.1f} forwards, solo = "
              f"{report.timings_s['solo'] / forward:.1f} forwards (load-independent cost measures)")


if __name__ == "__main__":
    main()
