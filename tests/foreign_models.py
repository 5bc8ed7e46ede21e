"""Classifiers of other architectures than ours, for `analyse` and
Study.from_models (tests/test_supplied.py): importable by name, as a user's
factory is (`--model foreign_models:tiny_vgg`)."""
from __future__ import annotations

import torch
from torch import nn


class TinyVGG(nn.Module):
    """A small VGG-style net: three conv blocks (32x32 -> 16 -> 8), global
    average pooling, a linear head. The deepest spatial feature map, where
    Grad-CAM reads when no layer is named, is `features` (its last ReLU, 8x8)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def tiny_vgg() -> TinyVGG:
    """The factory `analyse --model foreign_models:tiny_vgg` calls (seeded, so two calls agree)."""
    torch.manual_seed(0)
    return TinyVGG()


class MLP(nn.Module):
    """No spatial layer at all: Grad-CAM has nothing to read."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(x))


def mlp() -> MLP:
    return MLP()


def hundred_classes() -> nn.Module:
    """Logits for 100 classes: not a CIFAR-10 classifier."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 100))


def broken() -> nn.Module:
    raise RuntimeError("no such checkpoint on this machine")


def train_briefly(model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, *, steps: int = 30,
                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> nn.Module:
    """A few Adam steps on [0, 1] images normalised with the model's own
    mean/std: a foreign model with its own preprocessing, trained a little."""
    torch.manual_seed(1)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    x = (images_u8.float() / 255 - m) / s
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (64,))
        loss = nn.functional.cross_entropy(model(x[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
