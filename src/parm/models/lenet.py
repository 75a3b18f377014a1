"""LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling, for 28×28 or 32×32 inputs."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """conv5(6) -> pool -> conv5(16) -> pool -> 120 -> 84 -> classes.

    28×28 inputs are padded by 2 in the first convolution so both sizes reach a 5×5 map.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = in_shape
        pad = (32 - height) // 2 if height < 32 else 0
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),  # (N, 6, 14, 14)
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),  # (N, 16, 5, 5)
        )
        side_h = ((height + 2 * pad - 4) // 2 - 4) // 2
        side_w = ((width + 2 * pad - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * side_h * side_w, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))  # (N, C, H, W) -> (N, classes)
