"""Measure the per-op costs behind fxq's float-island cost model (fxq/frontend/islands.py).

For each op class, the float op and its int8 kernel are timed (batch 1, alternately, medians) at several
sizes; a straight line `overhead_us + ns_per_unit * units` is fitted to each, where a unit is an output
element (element-wise ops, pooling, conversions) or a multiply-accumulate (conv, linear, matmul). The
printed table is what islands.py's COSTS holds; rerun this on another CPU to re-derive it.

    OMP_WAIT_POLICY=PASSIVE python -m bench.experiments.island_costs [--threads 2] [--engine x86]
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Callable

import torch
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F

from fxq.report.latency import cpu_name

warnings.filterwarnings("ignore")

SCALE, ZERO = 0.05, 128


def quantize(x: torch.Tensor) -> torch.Tensor:
    return torch.quantize_per_tensor(x, SCALE, ZERO, torch.quint8).contiguous(memory_format=torch.channels_last) \
        if x.dim() == 4 else torch.quantize_per_tensor(x, SCALE, ZERO, torch.quint8)


def median_us(pairs: list[tuple[Callable[[], object], list[float]]], repeats: int = 40) -> list[float]:
    """Median wall time (us) of each callable, timed alternately after warm-up."""
    for fn, _ in pairs:
        for _ in range(3):
            fn()
    for _ in range(repeats):
        for fn, times in pairs:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return [sorted(times)[len(times) // 2] * 1e6 for _, times in pairs]


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (overhead_us, ns_per_unit) through (units, us) points, both clamped at >= 0."""
    units = torch.tensor([p[0] for p in points], dtype=torch.float64)
    micros = torch.tensor([p[1] for p in points], dtype=torch.float64)
    design = torch.stack([torch.ones_like(units), units], 1)
    solution = torch.linalg.lstsq(design, micros.unsqueeze(1)).solution.squeeze(1)
    return max(float(solution[0]), 0.0), max(float(solution[1]) * 1e3, 0.0)


def elementwise_cases() -> dict[str, Callable[[int], tuple[Callable, Callable, int]]]:
    """op class -> (channels -> (float call, int8 call, units))."""

    def image(channels: int, size: int = 28) -> torch.Tensor:
        return torch.randn(1, channels, size, size)

    def case_add(c):
        a, b = image(c), image(c)
        qa, qb = quantize(a), quantize(b)
        return (lambda: a + b), (lambda: torch.ops.quantized.add(qa, qb, SCALE, ZERO)), a.numel()

    def case_mul(c):
        a, b = image(c), image(c)
        qa, qb = quantize(a), quantize(b)
        return (lambda: a * b), (lambda: torch.ops.quantized.mul(qa, qb, SCALE, ZERO)), a.numel()

    def case_mul_broadcast(c):  # squeeze-excitation: (1, C, H, W) * (1, C, 1, 1)
        a, b = image(c), torch.rand(1, c, 1, 1)
        qa, qb = quantize(a), quantize(b)
        return (lambda: a * b), (lambda: torch.ops.quantized.mul(qa, qb, SCALE, ZERO)), a.numel()

    def case_cat(c):
        a, b = image(c), image(c)
        qa, qb = quantize(a), quantize(b)
        return (lambda: torch.cat([a, b], 1)), (lambda: torch.ops.quantized.cat([qa, qb], 1, SCALE, ZERO)), \
            2 * a.numel()

    def unary(float_fn, int8_fn):
        def case(c):
            a = image(c)
            qa = quantize(a)
            return (lambda: float_fn(a)), (lambda: int8_fn(qa)), a.numel()
        return case

    def case_pool(c):
        a = image(c, 56)
        qa = quantize(a)
        return (lambda: F.max_pool2d(a, 3, 2, 1)), (lambda: F.max_pool2d(qa, 3, 2, 1)), a.numel() // 4

    def case_avg_pool(c):
        a = image(c)
        qa = quantize(a)
        return (lambda: F.avg_pool2d(a, 3, 1, 1)), (lambda: F.avg_pool2d(qa, 3, 1, 1)), a.numel()

    def case_global_pool(c):  # units: input elements
        a = image(c)
        qa = quantize(a)
        return (lambda: F.adaptive_avg_pool2d(a, 1)), (lambda: F.adaptive_avg_pool2d(qa, 1)), a.numel()

    def case_interpolate(c):
        a = image(c, 14)
        qa = quantize(a)
        return (lambda: F.interpolate(a, scale_factor=2.0, mode="bilinear")), \
            (lambda: F.interpolate(qa, scale_factor=2.0, mode="bilinear")), 4 * a.numel()

    def case_layer_norm(c):
        a = torch.randn(1, 4 * c, 192)
        qa = quantize(a)
        norm = nnq.LayerNorm([192], torch.nn.Parameter(torch.ones(192)), torch.nn.Parameter(torch.zeros(192)),
                             SCALE, ZERO)
        return (lambda: F.layer_norm(a, [192])), (lambda: norm(qa)), a.numel()

    def case_softmax(c):
        a = torch.randn(1, c // 4, 49, 49)
        qa = quantize(a)
        softmax = nnq.Softmax(dim=-1, scale=1 / 256, zero_point=0)
        return (lambda: torch.softmax(a, -1)), (lambda: softmax(qa)), a.numel()

    def case_conversion(c):  # "float" column: quantize; "int8" column: dequantize (of an int8 conv's output)
        a = image(c)
        qa = quantize(a)
        return (lambda: torch.quantize_per_tensor(a, SCALE, ZERO, torch.quint8)), (lambda: qa.dequantize()), \
            a.numel()

    hardswish = nnq.Hardswish(SCALE, ZERO)
    return {
        "add": case_add, "mul": case_mul, "mul_broadcast": case_mul_broadcast, "cat": case_cat,
        "hardswish": unary(F.hardswish, hardswish), "hardsigmoid": unary(F.hardsigmoid, F.hardsigmoid),
        "sigmoid": unary(torch.sigmoid, torch.sigmoid), "relu": unary(F.relu, F.relu),
        "max_pool": case_pool, "avg_pool": case_avg_pool, "global_pool": case_global_pool,
        "interpolate": case_interpolate, "layer_norm": case_layer_norm, "softmax": case_softmax,
        "quantize/dequantize": case_conversion,
    }


def conv_case(cin: int, cout: int, k: int, size: int, groups: int = 1, dilation: int = 1):
    conv = torch.nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), groups=groups, dilation=dilation).eval()
    qconv = nnq.Conv2d(cin, cout, k, padding=dilation * (k // 2), groups=groups, dilation=dilation)
    weight = torch.quantize_per_channel(conv.weight.detach(), torch.full((cout,), 0.01),
                                        torch.zeros(cout, dtype=torch.long), 0, torch.qint8)
    qconv.set_weight_bias(weight, conv.bias.detach())
    qconv.scale, qconv.zero_point = SCALE, ZERO
    x = torch.randn(1, cin, size, size)
    qx = quantize(x)
    macs = cout * (cin // groups) * k * k * size * size
    return (lambda: conv(x)), (lambda: qconv(qx)), macs


def linear_case(features_in: int, features_out: int, tokens: int):
    linear = torch.nn.Linear(features_in, features_out).eval()
    qlinear = nnq.Linear(features_in, features_out)
    weight = torch.quantize_per_channel(linear.weight.detach(), torch.full((features_out,), 0.01),
                                        torch.zeros(features_out, dtype=torch.long), 0, torch.qint8)
    qlinear.set_weight_bias(weight, linear.bias.detach())
    qlinear.scale, qlinear.zero_point = SCALE, ZERO
    x = torch.randn(tokens, features_in)
    qx = quantize(x)
    return (lambda: linear(x)), (lambda: qlinear(qx)), features_in * features_out * tokens


def matmul_case(tokens: int, dim: int):
    a, b = torch.randn(4, tokens, dim), torch.randn(4, dim, tokens)
    qa, qb = quantize(a), quantize(b)
    return (lambda: torch.matmul(a, b)), (lambda: torch.ops.quantized.matmul(qa, qb, SCALE, ZERO)), \
        4 * tokens * tokens * dim


WEIGHTED = {
    "conv": lambda s: conv_case(s, s, 3, 28),
    "conv1x1": lambda s: conv_case(s, s, 1, 28),
    "conv_tiny": lambda s: conv_case(s, s // 4, 1, 1),  # squeeze-excitation fc on a 1x1 map
    "conv_grouped": lambda s: conv_case(s, s, 3, 28, groups=s // 16),
    "conv_depthwise": lambda s: conv_case(s, s, 3, 28, groups=s),
    # x86 sends depthwise convs with more than 100 groups to fbgemm, which has no dilated kernel and needs
    # channels in multiples of 8 for its fast path
    "conv_depthwise_fbgemm_slow": lambda s: conv_case(4 * s, 4 * s, 3, 14, groups=4 * s, dilation=2),
    "conv_depthwise_fbgemm_slow (not 8k channels)": lambda s: conv_case(4 * s + 4, 4 * s + 4, 3, 14, groups=4 * s + 4),
    "linear": lambda s: linear_case(s, s, 49),
    "matmul": lambda s: matmul_case(49, s // 4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engine", default="x86")
    parser.add_argument("--verbose", action="store_true", help="print every measured point")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = args.engine
    print(f"# {cpu_name()}, {args.threads} threads, engine {args.engine}, torch {torch.__version__}")
    print("# op: (float overhead us, float ns/unit, int8 overhead us, int8 ns/unit)")
    cases = {name: [build(c) for c in (4, 16, 64, 256)] for name, build in elementwise_cases().items()}
    cases.update({name: [build(c) for c in (32, 64, 128, 256)] for name, build in WEIGHTED.items()})
    with torch.inference_mode():
        for name, sizes in cases.items():
            float_points, int8_points = [], []
            for float_call, int8_call, units in sizes:
                float_us, int8_us = median_us([(float_call, []), (int8_call, [])])
                float_points.append((units, float_us))
                if args.verbose:
                    print(f"#   {name} units={units} float {float_us:.1f} us int8 {int8_us:.1f} us")
                int8_points.append((units, int8_us))
            float_fit, int8_fit = fit(float_points), fit(int8_points)
            print(f'"{name}": ({float_fit[0]:.1f}, {float_fit[1]:.4f}, {int8_fit[0]:.1f}, {int8_fit[1]:.4f}),')


if __name__ == "__main__":
    main()
