"""Error and range statistics, accumulated over batches so nothing but a few sums is kept.

Every ratio is computed from sums over all the data (not averaged per batch): the SQNR of a layer over
the eval set is 10*log10(sum x^2 / sum (x - y)^2) across every batch, the same number one would get from
concatenating the batches.
"""

from __future__ import annotations

import math

import torch


def to_db(signal_power: float, noise_power: float) -> float:
    """10*log10(signal / noise); +inf when there is no noise at all."""
    if noise_power <= 0.0:
        return math.inf
    if signal_power <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `test` against `reference`, in dB."""
    reference, test = reference.detach().float(), test.detach().float()
    return to_db(float(reference.square().sum()), float((reference - test).square().sum()))


class ErrorStats:
    """How far a test tensor is from a reference tensor, summed over every update.

    SQNR, MSE, cosine similarity of the flattened data and the largest absolute error.
    """

    def __init__(self) -> None:
        self.signal = 0.0  # sum of reference^2
        self.test_power = 0.0  # sum of test^2
        self.noise = 0.0  # sum of (reference - test)^2
        self.count = 0
        self.max_abs_error = 0.0

    def update(self, reference: torch.Tensor, test: torch.Tensor) -> None:
        # One pass per sum and one temporary, whatever the two tensors' memory layouts (int8 conv outputs
        # are channels-last): this runs on every activation of every layer.
        if reference.shape != test.shape:
            raise ValueError(f"shapes differ: reference {tuple(reference.shape)}, test {tuple(test.shape)}")
        if not reference.numel():
            return
        reference, test = reference.detach().float(), test.detach().float()
        error = reference - test
        self.signal += float(torch.linalg.vector_norm(reference)) ** 2
        self.test_power += float(torch.linalg.vector_norm(test)) ** 2
        self.noise += float(torch.linalg.vector_norm(error)) ** 2
        self.count += reference.numel()
        self.max_abs_error = max(self.max_abs_error, float(torch.linalg.vector_norm(error, ord=math.inf)))

    @property
    def sqnr_db(self) -> float:
        return to_db(self.signal, self.noise)

    @property
    def mse(self) -> float:
        return self.noise / self.count if self.count else 0.0

    @property
    def cosine(self) -> float:
        # <r, t> = (|r|^2 + |t|^2 - |r - t|^2) / 2: no third pass over the data; the cancellation costs
        # about 1e-6 of absolute accuracy, below the 5 digits shown.
        norms = math.sqrt(self.signal * self.test_power)
        dot = (self.signal + self.test_power - self.noise) / 2
        return max(-1.0, min(1.0, dot / norms)) if norms > 0 else 1.0


class ActivationStats:
    """Range of a float activation and its crest factor (peak |x| over RMS).

    The crest factor is the outlier ratio: a per-tensor int8 grid spans the peak, so its SQNR on this
    activation falls by about 20*log10(outlier_ratio) below that of a full-scale sine-like signal.
    """

    def __init__(self) -> None:
        self.minimum = math.inf
        self.maximum = -math.inf
        self.peak = 0.0
        self.power = 0.0
        self.count = 0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().float()
        if not values.numel():
            return
        low, high = torch.aminmax(values)
        self.minimum = min(self.minimum, float(low))
        self.maximum = max(self.maximum, float(high))
        self.peak = max(self.peak, abs(float(low)), abs(float(high)))
        self.power += float(torch.linalg.vector_norm(values)) ** 2
        self.count += values.numel()

    @property
    def rms(self) -> float:
        return math.sqrt(self.power / self.count) if self.count else 0.0

    @property
    def outlier_ratio(self) -> float:
        return self.peak / self.rms if self.rms > 0 else 1.0


def channel_range_ratio(weight: torch.Tensor) -> float:
    """Largest over smallest per-output-channel max |w|, over channels that are not all zero.

    Near 1 a per-tensor grid would suit every channel; depthwise convs after BN folding reach 100-1000,
    where only per-channel weight scales keep the small channels from rounding to zero.
    """
    ranges = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
    alive = ranges[ranges > 0]
    return float(alive.max() / alive.min()) if alive.numel() else 1.0
