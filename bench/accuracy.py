"""Accuracy protocol of the accuracy issue: real ImageNet MobileNetV2 on scikit-image photographs.

64 calibration crops (seed 1) and 256 evaluation crops (seed 2), see fxq.samples.random_crops. For each
flow: logits SQNR over the evaluation set, top-1 agreement with float, batch-1 latency ratio against
float eager (float and int8 timed alternately, medians after warm-up), and quantization time. fxq's
techniques are added one at a time so each one's gain is visible. torchao PT2E and OpenVINO NNCF
columns appear when those optional packages are installed.

    python bench/accuracy.py [--threads 2] [--eval 256] [--markdown]
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from tabulate import tabulate

import fxq
from fxq.report.latency import cpu_name, measure_latency
from fxq.samples import pretrained_mobilenet_v2, random_crops

warnings.filterwarnings("ignore")


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    return float(20 * torch.log10(reference.norm() / (reference - approximation).norm()))


def native_fx(model: torch.nn.Module, calibration: list[torch.Tensor]) -> torch.nn.Module:
    """PyTorch's own FX flow with its default x86 qconfig mapping (the baseline users get today)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (calibration[0][:1],))
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    return convert_fx(prepared)


def batch1_latency_ratio(float_model, int8_model, example) -> float:
    """Median int8 / float batch-1 latency, the two timed alternately after warm-up."""
    (row,) = measure_latency(float_model, int8_model, (example,), batch_sizes=(1,), repeats=30)
    return row.int8_median_ms / row.float_median_ms


FXQ_FLOWS = {
    "fxq: fold BN + fuse clamps only": dict(equalize=False, bias_correction=False, optimize_rounding=False),
    "fxq: + equalization": dict(bias_correction=False, optimize_rounding=False),
    "fxq: + bias correction": dict(optimize_rounding=False),
    "fxq default (+ optimized rounding)": dict(),
}
# accuracy-targeted mixed precision: blocks kept in float are chosen on the calibration crops
MIXED_FLOWS = {
    "fxq target_sqnr_db=20 (mixed precision)": dict(target_sqnr_db=20.0),
    "fxq target_sqnr_db=30 (mixed precision)": dict(target_sqnr_db=30.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed-precision rows (minutes each)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = pretrained_mobilenet_v2()
    calibration = list(random_crops(64, seed=1).split(16))
    evaluation = random_crops(args.eval, seed=2)
    with torch.no_grad():
        reference = torch.cat([model(chunk) for chunk in evaluation.split(32)])
    example = evaluation[:1]

    flows = {"PyTorch FX default (x86 qconfig mapping)": lambda: native_fx(model, calibration)}
    for name, options in {**FXQ_FLOWS, **({} if args.no_mixed else MIXED_FLOWS)}.items():
        flows[name] = lambda options=options: fxq.quantize(model, (example,), calibration_data=calibration, **options)

    rows = []
    for name, build in flows.items():
        start = time.perf_counter()
        quantized = build()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            logits = torch.cat([quantized(chunk) for chunk in evaluation.split(32)])
        agreement = float((logits.argmax(1) == reference.argmax(1)).float().mean())
        float_layers = len(fxq.summary_of(quantized).float_layers) if name in MIXED_FLOWS else 0
        rows.append([name + (f", {float_layers} layers float" if float_layers else ""),
                     f"{sqnr_db(reference, logits):.2f}", f"{100 * agreement:.1f}%",
                     f"{batch1_latency_ratio(model, quantized, example):.2f}", f"{seconds:.1f}"])
        print(rows[-1], flush=True)

    for package in ("torchao", "nncf"):
        try:
            __import__(package)
        except ImportError:
            rows.append([f"{package} (not installed)", "-", "-", "-", "-"])

    headers = ["flow", "logits SQNR dB", "top-1 agreement", "int8/float latency (batch 1)", "quantize s"]
    print(f"\nMobileNetV2 (ImageNet weights), {args.eval} eval crops, 64 calibration crops; CPU: "
          f"{cpu_name()}, threads={torch.get_num_threads()}, torch {torch.__version__}")
    print(tabulate(rows, headers=headers, tablefmt="github" if args.markdown else "simple"))


if __name__ == "__main__":
    main()
