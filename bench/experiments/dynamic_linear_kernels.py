"""Per-call time of the int8 Linear kernels a dynamic transformer layer could use, at MiniLM's shapes.

Rows are (tokens, in, out): 64 tokens is one sentence of 64, 1024 is a batch of 16. Columns: float
F.linear; torch.ao's per-tensor dynamic kernel (`quantized::linear_dynamic`, 8-bit input) on each engine;
the same after fxq's smoothing multiply; `torch._int_mm` alone (int8 x int8 -> int32, the per-token
kernel's core); and a per-token dynamic linear built on it in eager PyTorch (row scales, quantize,
_int_mm, rescale). Medians of 200 calls after 20 warm-up calls.

    python -m bench.experiments.dynamic_linear_kernels [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

SHAPES = [(64, 384, 384), (64, 384, 1536), (64, 1536, 384), (1024, 384, 1536), (1024, 1536, 384)]


def _median_us(call, count: int = 200) -> float:
    for _ in range(20):
        call()
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    engines = [e for e in ("onednn", "x86") if e in torch.backends.quantized.supported_engines]
    print("tokens in out | float | " + " | ".join(f"{e} dynamic | {e} +smoothing" for e in engines)
          + " | _int_mm | per-token on _int_mm  (us)")
    for tokens, inputs, outputs in SHAPES:
        x, weight, bias = torch.randn(tokens, inputs), torch.randn(outputs, inputs), torch.randn(outputs)
        smoothing = torch.rand(inputs) + 0.5
        row = [_median_us(lambda: torch.nn.functional.linear(x, weight, bias))]
        for engine in engines:
            torch.backends.quantized.engine = engine
            scale = weight.abs().amax(1) / 127
            packed = torch.ops.quantized.linear_prepack(
                torch.quantize_per_channel(weight, scale, torch.zeros(outputs, dtype=torch.long), 0, torch.qint8), bias)
            row.append(_median_us(lambda: torch.ops.quantized.linear_dynamic(x, packed, False)))
            row.append(_median_us(lambda: torch.ops.quantized.linear_dynamic(x * smoothing, packed, False)))
        weight_codes = (weight / (weight.abs().amax(1, keepdim=True) / 127)).round().to(torch.int8).t().contiguous()
        x_codes = (x * 10).round().clamp(-128, 127).to(torch.int8)
        row.append(_median_us(lambda: torch._int_mm(x_codes, weight_codes)))

        def per_token():
            row_scale = x.abs().amax(-1, keepdim=True) / 127
            return torch._int_mm(torch.round(x / row_scale).to(torch.int8), weight_codes) * row_scale

        row.append(_median_us(per_token))
        print(f"{tokens} {inputs} {outputs} | " + " | ".join(f"{value:.0f}" for value in row), flush=True)


if __name__ == "__main__":
    main()
