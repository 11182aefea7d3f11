"""Quantize torchvision's ImageNet MobileNetV2 to int8 and measure how close it stays to the float model.

Calibrates on 64 crops of scikit-image photographs (seed 1), evaluates on 128 other crops (seed 2), and
prints the logits SQNR, top-1 agreement, file sizes and what fxq did (engine, rewrites, float layers).

    python examples/quantize_mobilenet.py         # fxq's defaults, what users get
    python examples/quantize_mobilenet.py --fast  # skip optimized rounding, minmax ranges: quicker, less accurate
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

import fxq
from fxq.samples import pretrained_mobilenet_v2, random_crops

CALIBRATION_CROPS = 64
CALIBRATION_BATCH = 16
EVAL_CROPS = 128
# `--fast` drops GPTQ-style optimized rounding and the per-activation range choice (histogram searches),
# the two slowest steps.
FAST_OPTIONS: dict[str, Any] = dict(optimize_rounding=False, activation_observer="minmax")

# torch announces the deprecation of torch.ao int8 tensors and TorchScript on every call; fxq pins torch.
warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
warnings.filterwarnings("ignore", message="The TorchScript type system")


def logits_sqnr_db(float_logits: torch.Tensor, int8_logits: torch.Tensor) -> float:
    """20 log10(|y_float| / |y_float - y_int8|) over the whole batch of logits."""
    noise = (float_logits - int8_logits).norm()
    return math.inf if noise == 0 else float(20 * torch.log10(float_logits.norm() / noise))


def file_sizes_mb(float_model: torch.nn.Module, int8_model: torch.nn.Module) -> tuple[float, float]:
    """(float32 state_dict file, fxq.save file) sizes in MB."""
    with tempfile.TemporaryDirectory() as directory:
        float_path = Path(directory) / "float_state_dict.pt"
        torch.save(float_model.state_dict(), float_path)
        int8_path = fxq.save(int8_model, Path(directory) / "int8.pt")
        return float_path.stat().st_size / 1e6, int8_path.stat().st_size / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="quicker options, less accurate")
    args = parser.parse_args()
    options = FAST_OPTIONS if args.fast else {}

    model = pretrained_mobilenet_v2()
    calibration_crops = random_crops(CALIBRATION_CROPS, seed=1)
    eval_crops = random_crops(EVAL_CROPS, seed=2)

    start = time.perf_counter()
    int8_model = fxq.quantize(model, calibration_crops[:1],
                              calibration_data=list(calibration_crops.split(CALIBRATION_BATCH)), **options)
    quantize_seconds = time.perf_counter() - start

    with torch.no_grad():
        float_logits = model(eval_crops)
        int8_logits = int8_model(eval_crops)
    top1_agreement = float((float_logits.argmax(1) == int8_logits.argmax(1)).float().mean())
    float_mb, int8_mb = file_sizes_mb(model, int8_model)
    summary = fxq.summary_of(int8_model)

    print(f"MobileNetV2 (ImageNet), calibrated on {CALIBRATION_CROPS} crops, evaluated on {EVAL_CROPS} crops")
    print(tabulate([
        ["logits SQNR", f"{logits_sqnr_db(float_logits, int8_logits):.2f} dB"],
        ["top-1 agreement with float", f"{100 * top1_agreement:.1f} %"],
        ["float32 state_dict file", f"{float_mb:.2f} MB"],
        ["int8 file (fxq.save)", f"{int8_mb:.2f} MB ({int8_mb / float_mb:.2f}x)"],
        ["quantize time", f"{quantize_seconds:.1f} s"],
        ["engine", summary.engine],
        ["engine reason", summary.engine_reason],
        ["graph rewrites", len(summary.rewrites)],
        ["float layers", len(summary.float_layers)],
        ["options", ", ".join(f"{k}={v}" for k, v in options.items()) or "fxq defaults"],
    ], tablefmt="simple"))
    if summary.float_layers:
        print("\nlayers left in float:")
        print(tabulate(summary.float_layers, headers=["layer", "why"]))


if __name__ == "__main__":
    main()
