"""Small models for the CLI and report tests, loadable as `tests.cli_models:NAME`."""

from __future__ import annotations

import torch
from torch import nn


def tiny() -> nn.Module:
    """Conv-ReLU x2 + linear classifier; conv weights dominate the size so int8 shrinks it to about a third
    (TorchScript adds ~30 kB of code to the int8 file)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    ).eval()


class TwoHeads(nn.Module):
    """Returns a dict of tensors, to check that reports flatten structured outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.logits = nn.Linear(32, 10)
        self.box = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.pool(self.body(x)).flatten(1)
        return {"logits": self.logits(features), "box": self.box(features)}


def two_heads() -> nn.Module:
    torch.manual_seed(0)
    return TwoHeads().eval()


def not_a_model() -> str:
    return "not a module"


class Residual(nn.Module):
    """A conv read only by a residual add: onednn runs the two as one kernel (fxq/backend/conv_add.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(x + self.branch(x))


def residual() -> nn.Module:
    torch.manual_seed(0)
    return Residual().eval()
