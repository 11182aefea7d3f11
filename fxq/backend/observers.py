"""Activation observers PyTorch lacks: percentile and MSE-optimal ranges, both read off a histogram.

They subclass torch.ao's HistogramObserver (which keeps a running histogram of everything it sees) and
only change how the final range is chosen, so the engine's prepare/convert treat them like its own.
"""

from __future__ import annotations

import torch
from torch.ao.quantization.observer import HistogramObserver


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


class PercentileObserver(HistogramObserver):
    """Range spanning the given central percentile of observed values (clips rare outliers)."""

    def __init__(self, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(**kwargs)
        self.percentile = percentile

    @torch.jit.export
    def calculate_qparams(self):
        if self.histogram.sum() == 0 or float(self.max_val) == float(self.min_val):
            return super().calculate_qparams()
        cumulative = torch.cumsum(self.histogram.to(torch.float64), 0)
        cumulative = cumulative / cumulative[-1]
        tail = (100.0 - self.percentile) / 100.0
        edges = torch.linspace(float(self.min_val), float(self.max_val), self.bins + 1, dtype=torch.float64)
        low_index = int(torch.searchsorted(cumulative, torch.tensor(tail / 2, dtype=torch.float64)))
        high_index = int(torch.searchsorted(cumulative, torch.tensor(1 - tail / 2, dtype=torch.float64)))
        low = float(edges[low_index]) if float(self.min_val) < 0 else float(self.min_val)
        high = float(edges[min(high_index + 1, self.bins)])
        return self._calculate_qparams(torch.tensor(low), torch.tensor(high))


class MSEObserver(HistogramObserver):
    """Range minimizing the expected quantization MSE over the observed histogram (grid search)."""

    def __init__(self, steps: int = 100, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps = steps

    @torch.jit.export
    def calculate_qparams(self):
        low, high = float(self.min_val), float(self.max_val)
        if self.histogram.sum() == 0 or high == low:
            return super().calculate_qparams()
        best = (range_quantization_mse(self, low, high), low, high)
        for step in range(1, self.steps):
            shrink = 1.0 - step / self.steps
            candidate = (low * shrink if low < 0 else low, high * shrink if high > 0 else high)
            error = range_quantization_mse(self, *candidate)
            if error < best[0]:
                best = (error, *candidate)
        return self._calculate_qparams(torch.tensor(best[1]), torch.tensor(best[2]))
