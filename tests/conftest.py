"""Session fixtures: the real MobileNetV2 checkpoint and real photographic crops, built once."""

from __future__ import annotations

import pytest
import torch

from fxq.samples import pretrained_mobilenet_v2, random_crops


@pytest.fixture(scope="session")
def mobilenet() -> torch.nn.Module:
    """torchvision's ImageNet MobileNetV2 in eval mode (shared: tests must not modify it)."""
    return pretrained_mobilenet_v2()


@pytest.fixture(scope="session")
def calibration_crops() -> torch.Tensor:
    return random_crops(32, seed=1)


@pytest.fixture(scope="session")
def eval_crops() -> torch.Tensor:
    return random_crops(64, seed=2)
