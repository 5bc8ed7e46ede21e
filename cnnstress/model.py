"""CIFAR ResNet-18 (He et al. 2016, as in kuangliu/pytorch-cifar).

The CIFAR stem is one 3x3 convolution with stride 1 and no max-pool, so a
32x32 input reaches `layer4` as a 4x4 map with 512 channels. 11,173,962
parameters with 10 classes. `width` scales every stage's channels (64 is the
published network; the smoke profile's 16 has 1/16 of the convolution work,
so the tests and CI exercise every path in a fraction of the time).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import eval_mode

ARCH = "cifar_resnet18"


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_blocks: tuple[int, int, int, int] = (2, 2, 2, 2), num_classes: int = 10,
                 width: int = 64) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        stages = []
        for planes, blocks, stride in zip((width, 2 * width, 4 * width, 8 * width), num_blocks, (1, 2, 2, 2)):
            layers = []
            for s in [stride] + [1] * (blocks - 1):
                layers.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(8 * width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) normalised images -> (N,8*width,H/8,W/8) layer4 feature map."""
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(N,8*width,h,w) feature map -> (N,num_classes) logits."""
        return self.linear(torch.flatten(self.pool(features), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def resnet18(num_classes: int = 10, width: int = 64) -> ResNet:
    """CIFAR ResNet-18, randomly initialised (PyTorch defaults; seed before
    calling); `width` channels in the first stage (Config.width)."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, width=width)


def resnet18_for(config, num_classes: int = 10) -> ResNet:
    """The network a cnnstress.Config describes (its `width`): what training
    builds and what a checkpoint or published weights load into."""
    return resnet18(num_classes, width=config.width)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class ModelSummary:
    """A network's size and the shapes of one forward pass (a notebook shows it as a table)."""
    parameters: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    def __str__(self) -> str:
        return (f"parameters: {self.parameters:,}\n"
                f"forward: input {self.input_shape} -> logits {self.output_shape}")

    def _repr_markdown_(self) -> str:
        return ("| parameters | input | logits |\n|---|---|---|\n"
                f"| {self.parameters:,} | {self.input_shape} | {self.output_shape} |")


def summarise(model: nn.Module, input_shape: tuple[int, ...] = (2, 3, 32, 32)) -> ModelSummary:
    """`model`'s parameter count and its logits' shape for zero inputs of
    `input_shape` (one forward pass under no_grad, in eval mode for the call)."""
    with torch.no_grad(), eval_mode(model):
        out = model(torch.zeros(*input_shape))
    return ModelSummary(count_parameters(model), tuple(input_shape), tuple(out.shape))
