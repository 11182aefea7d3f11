"""Quantize torchvision's ImageNet MobileNetV2 to int8 and print fxq's report: size, latency, error, structure.

Calibrates on 64 crops of the scikit-image photographs (seed 1) and measures the error on 128 other crops
(seed 2). This is what `bash scripts/demo.sh` runs.

    python examples/quantize_mobilenet.py         # fxq's defaults
    python examples/quantize_mobilenet.py --fast  # nearest rounding, min-max ranges: quicker, less accurate
"""

from __future__ import annotations

import argparse
import time
import warnings

import fxq
from fxq.samples import pretrained_mobilenet_v2, random_crops

# torch announces the deprecation of torch.ao int8 tensors and TorchScript on every call; fxq pins torch.
warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
warnings.filterwarnings("ignore", message="The TorchScript type system")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="skip optimized rounding and the range choice")
    options = dict(optimize_rounding=False, activation_observer="minmax") if parser.parse_args().fast else {}

    model = pretrained_mobilenet_v2()
    calibration_batches = random_crops(64, seed=1).split(16)
    eval_batches = random_crops(128, seed=2).split(32)
    example_inputs = calibration_batches[0][:1]

    start = time.perf_counter()
    int8_model = fxq.quantize(model, example_inputs, calibration_data=calibration_batches, **options)
    quantize_seconds = time.perf_counter() - start

    print(f"MobileNetV2 (ImageNet weights): quantized in {quantize_seconds:.0f} s; error measured on 128 crops\n")
    print(fxq.report(model, int8_model, example_inputs, eval_data=eval_batches))

    summary = fxq.summary_of(int8_model)
    print("\nsummary")
    print(f"  {summary.equalized_pairs} layer pairs equalized, {summary.bias_corrected_layers} biases corrected, "
          f"{summary.rounded_layers} layers with optimized rounding")
    print("  quantize steps (s): " + ", ".join(f"{step} {seconds:.1f}" for step, seconds in summary.timings_s.items()))
    for note in summary.notes:
        print(f"  {note}")


if __name__ == "__main__":
    main()
