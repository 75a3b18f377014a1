"""Multi-layer perceptron of the paper: flatten -> 200 -> 100 -> classes, ReLU."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """784 -> 200 -> 100 -> classes for 28×28 grey images (any input shape is flattened)."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (200, 100)) -> None:
        super().__init__()
        sizes = [math.prod(in_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (N, *in_shape) -> (N, classes)
