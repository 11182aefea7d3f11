"""Quantization-aware training on scikit-learn's handwritten digits: float -> fxq.prepare_qat -> int8.

Trains a small conv net in float, fine-tunes it with fake quantization for a few epochs (ranges and
BatchNorm statistics frozen in the last one, the standard recipe), converts to int8 and prints both
accuracies on a held-out quarter of the data.

    python examples/qat_digits.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import fxq


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.classifier = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def train_epoch(model, optimizer, images, labels, generator, batch_size=32) -> None:
    model.train()
    order = torch.randperm(len(images), generator=generator)
    for start in range(0, len(images), batch_size):
        index = order[start:start + batch_size]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images[index]), labels[index]).backward()
        optimizer.step()


def train_qat(qat_model, images, labels, generator, epochs: int) -> None:
    """The standard QAT recipe: fine-tune at a low rate, with ranges and BN statistics frozen for the last epoch."""
    optimizer = torch.optim.Adam(qat_model.parameters(), lr=3e-4)
    for epoch in range(epochs):
        if epoch == epochs - 1:
            fxq.freeze_observers(qat_model)
            fxq.freeze_bn_stats(qat_model)
        train_epoch(qat_model, optimizer, images, labels, generator)


def accuracy(model, images, labels) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, test_x, test_y): a stratified 75/25 split of the 8x8 digits, scaled to [0, 1]."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=0.25, random_state=0,
                                                        stratify=labels)
    return train_x, train_y, test_x, test_y


def main() -> None:
    train_x, train_y, test_x, test_y = digits_split()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(6):
        train_epoch(model, optimizer, train_x, train_y, generator)
    model.eval()

    qat_model = fxq.prepare_qat(model, train_x[:32])
    train_qat(qat_model, train_x, train_y, generator, epochs=3)
    int8_model = fxq.convert(qat_model)

    print(f"float accuracy: {accuracy(model, test_x, test_y):.4f}")
    print(f"int8 accuracy: {accuracy(int8_model, test_x, test_y):.4f}")


if __name__ == "__main__":
    main()
