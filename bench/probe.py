"""One fxq.quantize call on the accuracy bench's MobileNetV2 protocol, with any options: a quick probe.

bench/accuracy.py runs every flow; this runs one, e.g. a keep_float set or another crop seed, and prints
logits SQNR, top-1 agreement, the engine and, with --latency, the batch-1 latency ratio against float
(timed before the batch-32 evaluation; see accuracy.measure_row).

    python -m bench.probe [--options '{"keep_float": ["features.14"]}'] [--calibration-seed 1 --eval-seed 2]
                          [--latency]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

import fxq
from bench.protocol import (CALIBRATION_SEED, EVAL_SEED, batch1_latency_ratio, mobilenet_protocol, outputs_in_batches,
                            sqnr_db, top1_agreement)
from fxq.report.latency import cpu_name, isa_limits

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", type=json.loads, default={}, help="fxq.quantize keyword arguments as JSON")
    parser.add_argument("--calibration-seed", type=int, default=CALIBRATION_SEED)
    parser.add_argument("--eval-seed", type=int, default=EVAL_SEED)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, calibration, evaluation, reference = mobilenet_protocol(args.calibration_seed, args.eval_seed, args.eval)
    start = time.perf_counter()
    quantized = fxq.quantize(model, (evaluation[:1],), calibration_data=calibration, **args.options)
    seconds = time.perf_counter() - start
    latency = batch1_latency_ratio(model, quantized, evaluation[:1]) if args.latency else None
    logits = outputs_in_batches(quantized, evaluation, 32)
    summary = fxq.summary_of(quantized)
    agreement = top1_agreement(reference, logits)
    print(f"options {json.dumps(args.options)}; crops {args.calibration_seed}/{args.eval_seed}; CPU {cpu_name()}"
          f"{isa_limits()}, threads={torch.get_num_threads()}")
    print(f"logits SQNR {sqnr_db(reference, logits):.2f} dB, top-1 agreement {100 * agreement:.1f}%, "
          f"engine {summary.engine}, {len(summary.float_layers)} layers float, quantize {seconds:.0f} s"
          + (f", int8/float latency {latency:.2f}" if latency is not None else ""))
    for note in summary.notes:
        print("note:", note)


if __name__ == "__main__":
    main()
