"""Accuracy protocol of the accuracy issue: real ImageNet MobileNetV2 on scikit-image photographs.

64 calibration crops (seed 1) and 256 evaluation crops (seed 2), see fxq.samples.random_crops. For each
flow: logits SQNR over the evaluation set, top-1 agreement with float, batch-1 latency ratio against
float eager (float and int8 timed alternately, medians after warm-up), and quantization time. fxq's
techniques are added one at a time so each one's gain is visible. torchao PT2E and OpenVINO NNCF
rows (bench/compare_flows.py) are measured when those optional packages are installed
(`pip install -e '.[compare]'`) and say "not installed" otherwise. Crops, baseline and metrics: bench/protocol.py.

    python -m bench.accuracy [--threads 2] [--eval 256] [--markdown] [--flows "PyTorch,torchao,nncf"]
                             [--calibration-seed 1 --eval-seed 2]  (other crops of the same photographs)

On a CPU with AVX-512 VNNI, `ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2` makes onednn and
fbgemm use their AVX2 kernels, whose u8 x s8 pair sums saturate as on a CPU without VNNI (fxq's probe
then sees saturation); the header names the caps. Float convs slow down with them too.
"""

from __future__ import annotations

import os
import tempfile

# torchao's row includes an inductor compile: like bench/suite.py, give inductor an empty cache directory
# (cold-compile times) unless the caller chose one.
FRESH_INDUCTOR_CACHE = __name__ == "__main__" and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
if FRESH_INDUCTOR_CACHE:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxq-accuracy-inductor-")

import argparse
import contextlib
import importlib.util
import shutil
import time
import warnings
from typing import Callable

import torch
from tabulate import tabulate

import fxq
from bench.compare_flows import FLOWS as EXTERNAL_FLOWS
from bench.protocol import (CALIBRATION_SEED, EVAL_SEED, NATIVE_ENGINE, batch1_latency_ratio, mobilenet_protocol,
                            native_fx_default, outputs_in_batches, sqnr_db, top1_agreement)
from fxq.backend.engine import using_engine
from fxq.report.latency import cpu_name, isa_limits

warnings.filterwarnings("ignore")

BASELINE = "PyTorch FX default (x86 qconfig mapping)"

# each row adds one technique to the row above it; the last row takes one out of the default
FXQ_FLOWS = {
    "fxq: fold BN + fuse clamps only (torch's histogram ranges)": dict(
        activation_observer="histogram", equalize=False, bias_correction=False, optimize_rounding=False),
    "fxq: + per-activation range choice": dict(equalize=False, bias_correction=False, optimize_rounding=False),
    "fxq: + equalization": dict(bias_correction=False, optimize_rounding=False),
    "fxq: + bias correction": dict(optimize_rounding=False),
    "fxq default (+ optimized rounding)": dict(),
    "fxq default with torch's histogram ranges": dict(activation_observer="histogram"),
}
# accuracy-targeted mixed precision: blocks kept in float are chosen on the calibration crops
MIXED_FLOWS = {
    "fxq target_sqnr_db=20 (mixed precision)": dict(target_sqnr_db=20.0),
    "fxq target_sqnr_db=30 (mixed precision)": dict(target_sqnr_db=30.0),
}


def selected(name: str, patterns: list[str] | None) -> bool:
    """Whether --flows asks for this row (case-insensitive substrings; no --flows: every row)."""
    return patterns is None or any(pattern.lower() in name.lower() for pattern in patterns)


def measure_row(name: str, build: Callable[[], Callable], model, evaluation, reference, example) -> list[str]:
    """One table row: build the quantized model (timed), then SQNR, agreement and latency against float."""
    start = time.perf_counter()
    quantized = build()
    seconds = time.perf_counter() - start
    # timed before the batch-32 evaluation: onednn (and x86's onednn convs) keep the kernel built for the
    # first input shape and rebuild it on every call of another (fxq.backend.engine.repack_weights), so
    # batch 1 after batch 32 measured fxq's onednn model at 7.5 ms instead of 3.4 ms
    latency = batch1_latency_ratio(model, quantized, example)
    logits = outputs_in_batches(quantized, evaluation, 32)
    agreement = top1_agreement(reference, logits)
    float_layers = len(fxq.summary_of(quantized).float_layers) if name in MIXED_FLOWS else 0
    return [name + (f", {float_layers} layers float" if float_layers else ""),
            f"{sqnr_db(reference, logits):.2f}", f"{100 * agreement:.1f}%", f"{latency:.2f}", f"{seconds:.1f}"]


def external_row(name: str, package: str, build: Callable[[], Callable], *measure_args) -> list[str]:
    """A row of another library's flow: measured like fxq's when the package is installed, otherwise a
    'not installed' row; a flow that raises becomes a 'failed' row so the other rows still print."""
    if importlib.util.find_spec(package) is None:
        return [f"{name} ({package} not installed)", "-", "-", "-", "-"]
    try:
        return measure_row(name, build, *measure_args)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return [f"{name} (failed: {type(exc).__name__}: {first_line[:120]})", "-", "-", "-", "-"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--calibration-seed", type=int, default=CALIBRATION_SEED)
    parser.add_argument("--eval-seed", type=int, default=EVAL_SEED)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed-precision rows (minutes each)")
    parser.add_argument("--flows", metavar="SUBSTRING[,SUBSTRING...]",
                        type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
                        help="only the rows whose name contains one of these (case-insensitive), "
                             "e.g. 'PyTorch,torchao,nncf' leaves out fxq's rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, calibration, evaluation, reference = mobilenet_protocol(args.calibration_seed, args.eval_seed, args.eval)
    example = evaluation[:1]
    measure_args = (model, evaluation, reference, example)

    flows = {BASELINE: lambda: native_fx_default(model, calibration)}
    for name, options in {**FXQ_FLOWS, **({} if args.no_mixed else MIXED_FLOWS)}.items():
        flows[name] = lambda options=options: fxq.quantize(model, (example,), calibration_data=calibration, **options)

    rows = []
    for name, build in flows.items():
        if selected(name, args.flows):
            # fxq.quantize leaves the engine it chose set; PyTorch's model runs on the one it was converted for
            with using_engine(NATIVE_ENGINE) if name == BASELINE else contextlib.nullcontext():
                rows.append(measure_row(name, build, *measure_args))
            print(rows[-1], flush=True)
    for name, (package, flow) in EXTERNAL_FLOWS.items():
        if selected(name, args.flows):
            rows.append(external_row(name, package, lambda flow=flow: flow(model, calibration, example),
                                     *measure_args))
            print(rows[-1], flush=True)

    headers = ["flow", "logits SQNR dB", "top-1 agreement", "int8/float latency (batch 1)", "quantize s"]
    print(f"\nMobileNetV2 (ImageNet weights), {args.eval} eval crops (seed {args.eval_seed}), 64 calibration crops "
          f"(seed {args.calibration_seed}); CPU: "
          f"{cpu_name()}{isa_limits()}, threads={torch.get_num_threads()}, torch {torch.__version__}")
    print(tabulate(rows, headers=headers, tablefmt="github" if args.markdown else "simple"))


if __name__ == "__main__":
    try:
        main()
    finally:
        if FRESH_INDUCTOR_CACHE:
            shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
