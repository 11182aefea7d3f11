"""The torchvision models of the coverage issue, built so that random weights behave like trained ones.

A torchvision model with `weights=None` is not a fair test subject as it comes: with the default init,
activations of deep BatchNorm networks shrink layer after layer (MobileNetV2's logits are ~1e-10 and
reach the denormal range, where float kernels run 10x slower), and ViT's head is all zeros. So every
model is built with a fixed seed, zero-initialized weights are re-drawn, and BatchNorm statistics are
re-estimated on real photographic crops (train-mode forwards, cumulative average): each BN layer then
sees normalized activations, as in a trained network. Used by tests/test_coverage.py and
bench/coverage.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torchvision
from torch import nn

from fxq.samples import random_crops


@dataclass(frozen=True)
class CoverageModel:
    """One model of the coverage list: how to build it and the input it is tested at."""

    name: str
    kind: str  # "classification", "segmentation" or "detection"
    test_size: int  # smallest input the model takes comfortably (tests); benchmarks use `bench_size`
    bench_size: int = 224
    kwargs: dict[str, Any] = field(default_factory=dict)


CLASSIFICATION = [
    CoverageModel("resnet18", "classification", 64),
    CoverageModel("resnet50", "classification", 64),
    CoverageModel("resnext50_32x4d", "classification", 64),
    CoverageModel("wide_resnet50_2", "classification", 64),
    CoverageModel("mobilenet_v2", "classification", 64),
    CoverageModel("mobilenet_v3_small", "classification", 64),
    CoverageModel("mobilenet_v3_large", "classification", 64),
    CoverageModel("shufflenet_v2_x1_0", "classification", 64),
    CoverageModel("squeezenet1_1", "classification", 64),
    CoverageModel("mnasnet1_0", "classification", 64),
    CoverageModel("googlenet", "classification", 64, kwargs=dict(aux_logits=False, init_weights=True)),
    CoverageModel("inception_v3", "classification", 75, 299, kwargs=dict(aux_logits=False, init_weights=True)),
    CoverageModel("densenet121", "classification", 64),
    CoverageModel("efficientnet_b0", "classification", 64),
    CoverageModel("efficientnet_v2_s", "classification", 64),
    CoverageModel("regnet_x_400mf", "classification", 64),
    CoverageModel("regnet_y_400mf", "classification", 64),
    CoverageModel("convnext_tiny", "classification", 64),
    CoverageModel("vgg11_bn", "classification", 64),
    CoverageModel("alexnet", "classification", 64),
    CoverageModel("vit_b_16", "classification", 224),
    CoverageModel("swin_t", "classification", 224),
    CoverageModel("maxvit_t", "classification", 224),
]
SEGMENTATION = [
    CoverageModel("fcn_resnet50", "segmentation", 64, kwargs=dict(weights_backbone=None, aux_loss=False)),
    CoverageModel("deeplabv3_mobilenet_v3_large", "segmentation", 64,
                  kwargs=dict(weights_backbone=None, aux_loss=False)),
    CoverageModel("lraspp_mobilenet_v3_large", "segmentation", 64, kwargs=dict(weights_backbone=None)),
]
DETECTION = [
    CoverageModel("fasterrcnn_mobilenet_v3_large_fpn", "detection", 320, 320,
                  kwargs=dict(weights_backbone=None, min_size=320, max_size=320)),
    CoverageModel("retinanet_resnet50_fpn", "detection", 320, 320,
                  kwargs=dict(weights_backbone=None, min_size=320, max_size=320)),
    CoverageModel("ssdlite320_mobilenet_v3_large", "detection", 320, 320, kwargs=dict(weights_backbone=None)),
]
MODELS = {spec.name: spec for spec in CLASSIFICATION + SEGMENTATION + DETECTION}


def _builder(spec: CoverageModel) -> Callable[..., nn.Module]:
    namespace = {"classification": torchvision.models, "segmentation": torchvision.models.segmentation,
                 "detection": torchvision.models.detection}[spec.kind]
    return getattr(namespace, spec.name)


def _redraw_zero_weights(model: nn.Module) -> None:
    """Zero-initialized conv/linear weights (ViT's head) make the output constant; draw them like PyTorch's
    default init instead."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not module.weight.detach().any():
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 8) -> None:
    """Re-estimate every BatchNorm's running statistics on `images` (cumulative average over batches)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    for batch in images.split(batch_size):
        model(batch)
    for norm in norms:
        norm.momentum = 0.1
    model.eval()


_DETECTORS = (torchvision.models.detection.generalized_rcnn.GeneralizedRCNN,
              torchvision.models.detection.RetinaNet, torchvision.models.detection.ssd.SSD)


def build(name: str, size: int | None = None) -> nn.Module:
    """The named model in eval mode: seeded random weights, zero weights re-drawn, BN statistics estimated
    on crops of `size` (default: the test size)."""
    spec = MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _builder(spec)(weights=None, **spec.kwargs)
        _redraw_zero_weights(model)
        images = crops(spec, 16, seed=7, size=size)
        if isinstance(model, _DETECTORS):  # train mode needs targets: re-estimate the backbone's statistics
            model.eval()
            with torch.no_grad():
                images = model.transform(list(images))[0].tensors
            recalibrate_batchnorm(model.backbone, images)
        else:
            recalibrate_batchnorm(model, images)
    return model.eval()


def crops(spec: CoverageModel, count: int, seed: int, size: int | None = None) -> torch.Tensor:
    """Real photographic crops at the model's input size (detectors take [0, 1] images, not normalized)."""
    images = random_crops(count, seed=seed, size=size or spec.test_size)
    if spec.kind == "detection":
        from fxq.samples import IMAGENET_MEAN, IMAGENET_STD

        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        images = (images * std + mean).clamp(0, 1)
    return images
