"""ResNet-18 for small images (He et al. 2016, the common CIFAR variant).

The CIFAR variant replaces ImageNet's 7×7 stride-2 stem and max-pool with one 3×3 stride-1
convolution, so 32×32 inputs keep their resolution into the first stage (32 -> 16 -> 8 -> 4).
The 28×28 variant (MNIST-sized, one channel) is the same network built for that input: its
stages go 28 -> 14 -> 7 -> 4, and global average pooling makes the head size-free.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with batch norm and an identity (or 1×1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))  # (N, c_in, H, W) -> (N, c_out, H/s, W/s)
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class ResNet18(nn.Module):
    """3×3 stem, four stages of two BasicBlocks (64, 128, 256, 512), global pool, linear head."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, width: int = 64) -> None:
        super().__init__()
        channels = in_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, c_in = [], width
        for i, c_out in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))  # (N, C, H, W) -> (N, classes)
