"""Activation observers PyTorch lacks: percentile, MSE-optimal and per-activation chosen ranges, read off a histogram.

They subclass torch.ao's HistogramObserver (which keeps a running histogram of what it sees) and only
change how the final range is chosen, so the engine's prepare/convert treat them like its own. Every
activation observer fxq uses reads a channels-last input through its contiguous view, and the histogram
ones build their histogram from a sample of each large input (`histogram_sample`), for calibration speed.
"""

from __future__ import annotations

import math

import torch
from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver


def contiguous_view(x: torch.Tensor) -> torch.Tensor:
    """The same values as a contiguous tensor without a copy when `x` is channels-last (its NHWC permute).

    fxq calibrates in channels-last where the model allows it (calibration.channels_last_batches), but
    torch's full reductions are slow on that layout: aminmax took 50 against 5 ms and histc 78 against 33
    ms on a 16x96x112x112 channels-last tensor and its contiguous view (2 threads). An activation
    observer's statistics do not depend on the order of the values."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1)
    return x


class _ReadsContiguousView:
    """Mixin for an activation observer: it records `contiguous_view` of its input, and passes the input on."""

    def forward(self, x_orig):
        super().forward(contiguous_view(x_orig))
        return x_orig


class ChannelsLastMinMaxObserver(_ReadsContiguousView, MinMaxObserver):
    """torch.ao's MinMaxObserver, as fast on channels-last inputs as on contiguous ones."""


class ChannelsLastMovingAverageMinMaxObserver(_ReadsContiguousView, MovingAverageMinMaxObserver):
    """torch.ao's MovingAverageMinMaxObserver, as fast on channels-last inputs as on contiguous ones."""


# An activation's histogram takes at most about this many of each call's values (and the exact extremes).
# A histogram over 2048 bins cost ResNet-50's calibration as much as its convs did (2.1 of 6.0 s at 64
# crops); a million evenly spread values estimate the shares of its bins, and the range rules use only
# shares, never counts.
HISTOGRAM_VALUES = 2**20


def _stride_coprime_to(size: int, wanted: int) -> int:
    """The smallest prime at least `wanted` that does not divide `size`: every `stride`-th value of a tensor
    whose last dimension is `size` then visits every index of that dimension (no channel left out)."""
    candidate = max(wanted, 2)
    while True:
        if all(candidate % d for d in range(2, math.isqrt(candidate) + 1)) and size % candidate:
            return candidate
        candidate += 1


def histogram_sample(x: torch.Tensor) -> torch.Tensor:
    """About HISTOGRAM_VALUES of x's values, evenly spread over its elements, plus its minimum and maximum
    (so the observed range stays exact); x itself when it holds fewer than twice that many."""
    x = contiguous_view(x.detach())
    wanted = x.numel() // HISTOGRAM_VALUES
    if wanted < 2 or not x.is_contiguous():
        return x
    low, high = torch.aminmax(x)
    values = x.reshape(-1)[::_stride_coprime_to(x.shape[-1], wanted)]
    return torch.cat([values, low.reshape(1), high.reshape(1)])


class SampledHistogramObserver(HistogramObserver):
    """torch.ao's HistogramObserver on `histogram_sample` of each input (which it passes on unchanged)."""

    def forward(self, x_orig):
        super().forward(histogram_sample(x_orig))
        return x_orig


def _bin_centers(observer: HistogramObserver) -> torch.Tensor:
    low, high = float(observer.min_val), float(observer.max_val)
    width = (high - low) / observer.bins
    return low + width * (torch.arange(observer.bins, dtype=torch.float64) + 0.5)


def range_quantization_mse(observer: HistogramObserver, low: float, high: float) -> float:
    """Expected squared error of quantizing the observed histogram to [low, high] with this dtype's levels."""
    centers = _bin_centers(observer)
    counts = observer.histogram.to(torch.float64)
    low, high = min(low, 0.0), max(high, 0.0)
    levels = observer.quant_max - observer.quant_min
    scale = max((high - low) / levels, 1e-12)
    zero_point = round(-low / scale)
    q = torch.clamp(torch.round(centers / scale) + zero_point, 0, levels)
    error = (q - zero_point) * scale - centers
    return float((counts * error * error).sum() / counts.sum().clamp_min(1))


def percentile_range(observer: HistogramObserver, percentile: float) -> tuple[float, float]:
    """The range spanning the central `percentile` of the observed values (the low end stays the minimum
    when nothing observed is negative)."""
    cumulative = torch.cumsum(observer.histogram.to(torch.float64), 0)
    cumulative = cumulative / cumulative[-1]
    tail = (100.0 - percentile) / 100.0
    edges = torch.linspace(float(observer.min_val), float(observer.max_val), observer.bins + 1, dtype=torch.float64)
    low_index = int(torch.searchsorted(cumulative, torch.tensor(tail / 2, dtype=torch.float64)))
    high_index = int(torch.searchsorted(cumulative, torch.tensor(1 - tail / 2, dtype=torch.float64)))
    low = float(edges[low_index]) if float(observer.min_val) < 0 else float(observer.min_val)
    return low, float(edges[min(high_index + 1, observer.bins)])


def shrunk_ranges(observer: HistogramObserver, steps: int) -> list[tuple[float, float]]:
    """The min-max range and `steps - 1` ranges shrunk towards zero by equal fractions."""
    low, high = float(observer.min_val), float(observer.max_val)
    ranges = []
    for step in range(steps):
        shrink = 1.0 - step / steps
        ranges.append((low * shrink if low < 0 else low, high * shrink if high > 0 else high))
    return ranges


def least_error_range(observer: HistogramObserver, candidates: list[tuple[float, float]]) -> tuple[float, float]:
    """The candidate range with the smallest quantization MSE over the observed histogram (the first on ties)."""
    return min(candidates, key=lambda bounds: range_quantization_mse(observer, *bounds))


def _observed(observer: HistogramObserver) -> bool:
    return bool(observer.histogram.sum() > 0) and float(observer.max_val) != float(observer.min_val)


def _qparams(observer: HistogramObserver, bounds: tuple[float, float]):
    """The observer's (scale, zero_point) for the range `bounds`."""
    like = dict(dtype=observer.min_val.dtype, device=observer.min_val.device)
    return observer._calculate_qparams(torch.tensor(bounds[0], **like), torch.tensor(bounds[1], **like))


DEFAULT_PERCENTILE = 99.99
DEFAULT_STEPS = 100


class PercentileObserver(SampledHistogramObserver):
    """Range spanning the given central percentile of observed values (clips rare outliers)."""

    def __init__(self, percentile: float = DEFAULT_PERCENTILE, **kwargs) -> None:
        super().__init__(**kwargs)
        self.percentile = percentile

    @torch.jit.export
    def calculate_qparams(self):
        if not _observed(self):
            return super().calculate_qparams()
        return _qparams(self, percentile_range(self, self.percentile))


class MSEObserver(SampledHistogramObserver):
    """Range minimizing the expected quantization MSE over the observed histogram (grid search)."""

    def __init__(self, steps: int = DEFAULT_STEPS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps = steps

    @torch.jit.export
    def calculate_qparams(self):
        if not _observed(self):
            return super().calculate_qparams()
        return _qparams(self, least_error_range(self, shrunk_ranges(self, self.steps)))


class AutoRangeObserver(MSEObserver):
    """Per activation, the candidate range with the least quantization error, estimated on its calibration
    histogram.

    Candidates: min-max and its shrunk versions (MSEObserver's search), the central DEFAULT_PERCENTILE, and torch's
    own histogram search (HistogramObserver, torch.ao's default for x86). Each is scored by the expected
    squared rounding and clipping error over the observed histogram; no single rule wins everywhere
    (on MobileNetV2 the choice falls on each of histogram, mse and percentile somewhere).

    On ImageNet MobileNetV2 (bench/probe.py, default options otherwise, AVX-512 VNNI, 8 pairs of crop
    seeds 1/2 .. 15/16) torch's histogram search for every activation gave 20.39 dB logits SQNR on
    average (19.99 to 20.87) and 86.7% top-1 agreement (84.0 to 89.8%); this choice 20.95 dB (20.68 to
    21.23) and 88.1% (86.7 to 89.5%). On crops 1/2 alone min-max gave 20.10 dB, the 99.99th percentile
    18.97, the MSE search alone 20.97, histogram 20.45, this choice 20.97. (All measured before bias
    correction matched clamped outputs; after it, crops 1/2 give 20.94 with this choice, 20.47 with
    histogram.) It is not the best rule on every model: on random-weight ResNet-50 with the recovery
    passes off (bench/generalization.py's crops, VNNI) min-max gave 15.79 dB, this choice 14.63,
    histogram 13.74.
    """

    def __init__(self, steps: int = DEFAULT_STEPS, **kwargs) -> None:
        super().__init__(steps=steps, **kwargs)
        # (rule, range) once chosen: quantize reads the qparams several times after calibration (the
        # summary, the float simulation, each candidate engine's convert), ~8 ms of search each time
        self._choice: tuple[str, tuple[float, float]] | None = None

    @property
    def chosen(self) -> str:
        """Which candidate won, for the summary ("" before any range was chosen)."""
        return self._choice[0] if self._choice is not None else ""

    def forward(self, x_orig):
        self._choice = None  # new data: choose again
        return super().forward(x_orig)

    def _load_from_state_dict(self, *args, **kwargs):
        self._choice = None
        super()._load_from_state_dict(*args, **kwargs)

    def calculate_qparams(self):
        if not _observed(self):
            self._choice = ("constant", (float(self.min_val), float(self.max_val)))
            return HistogramObserver.calculate_qparams(self)
        if self._choice is None:
            self._choice = self._choose()
        return _qparams(self, self._choice[1])

    def _choose(self) -> tuple[str, tuple[float, float]]:
        low, high = self._non_linear_param_search()
        shrunk = shrunk_ranges(self, self.steps)
        named = [("histogram", (float(low), float(high))), ("percentile", percentile_range(self, DEFAULT_PERCENTILE))]
        named += [("minmax" if index == 0 else "mse", bounds) for index, bounds in enumerate(shrunk)]
        bounds = least_error_range(self, [bounds for _, bounds in named])
        # equal ranges from different rules (percentile and histogram often return min-max) are min-max
        rule = "minmax" if bounds == shrunk[0] else next(name for name, candidate in named if candidate == bounds)
        return rule, bounds
