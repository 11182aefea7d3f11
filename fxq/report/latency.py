"""Float vs int8 latency on this CPU: median and p90 per batch size.

The two models are timed alternately in one loop (float, int8, float, ...) so that frequency scaling,
other processes and cache state drift hit both equally instead of biasing whichever ran second.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn


@dataclass
class LatencyRow:
    batch_size: int
    threads: int
    float_median_ms: float
    float_p90_ms: float
    int8_median_ms: float
    int8_p90_ms: float

    @property
    def speedup(self) -> float:
        return self.float_median_ms / self.int8_median_ms if self.int8_median_ms > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": round(self.speedup, 3)}


@contextmanager
def _num_threads(threads: int | None) -> Iterator[int]:
    """Run with `threads` intra-op threads (None: leave as is); the caller's setting is restored."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def resize_batch(example_inputs: tuple[Any, ...], batch_size: int) -> tuple[Any, ...]:
    """The example inputs with every tensor's first dimension made `batch_size` (by slicing or repeating)."""
    resized = []
    for value in example_inputs:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape[0] >= batch_size:
                value = value[:batch_size]
            else:
                repeats = -(-batch_size // value.shape[0])
                value = value.repeat(repeats, *([1] * (value.dim() - 1)))[:batch_size]
        resized.append(value)
    return tuple(resized)


def _quantile_ms(samples_s: list[float], q: float) -> float:
    return round(float(torch.tensor(samples_s).quantile(q)) * 1000.0, 3)


def measure_latency(float_model: nn.Module, quantized_model: nn.Module, example_inputs: tuple[Any, ...], *,
                    batch_sizes: Sequence[int] = (1,), threads: int | None = None, warmup: int = 3,
                    repeats: int = 15) -> list[LatencyRow]:
    """Median and p90 wall time (ms) of one forward pass of each model, per batch size."""
    rows = []
    with _num_threads(threads) as used_threads, torch.inference_mode():
        for batch_size in batch_sizes:
            inputs = resize_batch(example_inputs, batch_size)
            for _ in range(warmup):
                float_model(*inputs)
                quantized_model(*inputs)
            float_times, int8_times = [], []
            for _ in range(repeats):
                for model, times in ((float_model, float_times), (quantized_model, int8_times)):
                    start = time.perf_counter()
                    model(*inputs)
                    times.append(time.perf_counter() - start)
            rows.append(LatencyRow(batch_size, used_threads, _quantile_ms(float_times, 0.5),
                                   _quantile_ms(float_times, 0.9), _quantile_ms(int8_times, 0.5),
                                   _quantile_ms(int8_times, 0.9)))
    return rows


def module_times_us(model: nn.Module, example_inputs: tuple[Any, ...], names: Sequence[str], *,
                    warmup: int = 3, repeats: int = 15, fastest: bool = False) -> dict[str, float]:
    """Median time (us) each named submodule of `model` takes per forward pass on `example_inputs`; with
    `fastest`, the shortest pass instead (the time the module needs when nothing else competes for the
    cores, which a busy machine's median does not show).

    The modules are timed by forward hooks inside whole passes of the model, so each runs on its real
    inputs (their layout, the caches the ops before it leave). A module called twice in a pass counts both.
    """
    modules = {name: model.get_submodule(name) for name in names}
    started: dict[str, float] = {}
    passes: dict[str, list[float]] = {name: [] for name in modules}
    current: dict[str, float] = {}

    def before(name: str):
        def hook(_module, _args):
            started[name] = time.perf_counter()
        return hook

    def after(name: str):
        def hook(_module, _args, _output):
            current[name] = current.get(name, 0.0) + time.perf_counter() - started.pop(name)
        return hook

    handles = [handle for name, module in modules.items()
               for handle in (module.register_forward_pre_hook(before(name)),
                              module.register_forward_hook(after(name)))]
    try:
        with torch.inference_mode():
            for step in range(warmup + repeats):
                current.clear()
                model(*example_inputs)
                if step >= warmup:
                    for name in modules:
                        passes[name].append(current.get(name, 0.0))
    finally:
        for handle in handles:
            handle.remove()
    return {name: (min(times) if fastest else float(torch.tensor(times).median())) * 1e6
            for name, times in passes.items()}


def layer_inputs(model: nn.Module, example_inputs: tuple[Any, ...], names: Iterable[str]) -> dict[str, tuple]:
    """The positional arguments each named submodule of `model` gets first in a pass of the example inputs
    (to time the submodules on their own, on real inputs)."""
    seen: dict[str, tuple] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, args)
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in names]
    try:
        with torch.inference_mode():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def fastest_call_us(call: Callable[..., Any], args: tuple, repeats: int = 5) -> float:
    """The shortest of `repeats` calls of `call(*args)` after one warm-up call, in microseconds (the time it
    needs when nothing else competes for the cores)."""
    with torch.inference_mode():
        call(*args)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            call(*args)
            best = min(best, time.perf_counter() - start)
    return best * 1e6


def cpu_name() -> str:
    """The CPU's model name (for benchmark headers), or the machine type where it cannot be read."""
    import platform

    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Environment variables that cap the instruction set the int8 kernels use (an AVX-512 VNNI machine then
# computes as one with AVX2 only: same saturating pair sums, same numbers).
# Environment variables that cap the instruction set of one of torch's kernel libraries (oneDNN, FBGEMM,
# MKL's BLAS for float linear layers, ATen's own vectorized ops), to emulate an older CPU on a newer one.
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def isa_limits() -> str:
    """' (ONEDNN_MAX_CPU_ISA=AVX2, ...)' for benchmark headers when the kernels' ISA is capped, else ''."""
    import os

    caps = [f"{name}={os.environ[name]}" for name in ISA_LIMITS if name in os.environ]
    return f" ({', '.join(caps)})" if caps else ""
