"""Tiny models with known answers, for tests and frontend benchmarks.

``linear`` is F(x) = W·vec(x) + b with seeded weights; ``linear_parity`` is its exact parity
model for the addition code with k queries (same W, bias k·b), so decoded outputs can be
checked to float tolerance. ``pooled_linear`` sees the image through the k-tile grid's area
mean and ``pooled_linear_tiles`` is its exact parity model for the ``tiles`` code (a prediction
per member). ``constant`` is the cheapest possible model (frontend overhead).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Linear(nn.Module):
    """F(x) = W·vec(x) + bias_scale·b, seeded."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, seed: int = 0, bias_scale: float = 1.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(num_classes, math.prod(in_shape), generator=g) / math.prod(in_shape) ** 0.5)
        self.bias = nn.Parameter(torch.randn(num_classes, generator=g) * bias_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias  # (N, *S) -> (N, C)


def linear(in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, seed: int = 0) -> nn.Module:
    return Linear(tuple(in_shape), num_classes, seed)


def linear_parity(in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, seed: int = 0, k: int = 2,
                  parity_index: int = 0) -> nn.Module:
    """The exact addition-code parity model ``parity_index`` of ``linear(in_shape, num_classes, seed)``:
    F(x) = Ax + b and P = Σ_j w_j X_j with w_j = (j + 1) ** parity_index give F_P(P) = AP + (Σ_j w_j) b."""
    return Linear(tuple(in_shape), num_classes, seed, bias_scale=float(sum((j + 1) ** parity_index for j in range(k))))


class PooledLinear(nn.Module):
    """F(x) = W·vec(area-mean of x to one tile of the k-grid) + b; with ``tiles=True`` the exact
    ``tiles``-code parity model: F of each tile of the parity image, (N, k·C)."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, k: int, seed: int = 0, tiles: bool = False) -> None:
        super().__init__()
        from parm.coding.encoders import concat_grid

        channels, height, width = in_shape
        self.k, self.tiles = k, tiles
        self.rows, self.cols = concat_grid(k)
        self.th, self.tw = height // self.rows, width // self.cols
        self.linear = Linear((channels, self.th, self.tw), num_classes, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tiles:
            return self.linear(nn.functional.adaptive_avg_pool2d(x, (self.th, self.tw)))  # (N, C)
        outs = []
        for j in range(self.k):
            row, col = divmod(j, self.cols)
            outs.append(self.linear(x[:, :, row * self.th:(row + 1) * self.th, col * self.tw:(col + 1) * self.tw]))
        return torch.cat(outs, dim=1)  # k × (N, C) -> (N, k·C)


def pooled_linear(in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, k: int = 2,
                  seed: int = 0) -> nn.Module:
    return PooledLinear(tuple(in_shape), num_classes, k, seed)


def pooled_linear_tiles(in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, k: int = 2,
                        seed: int = 0) -> nn.Module:
    return PooledLinear(tuple(in_shape), num_classes, k, seed, tiles=True)


class Constant(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.num_classes)  # (N, *S) -> (N, C)


def constant(num_classes: int = 10) -> nn.Module:
    return Constant(num_classes)


def linear_unless(marker: str, in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """``linear``, but loading fails while the file ``marker`` exists: a model that cannot load
    (a crash loop) for as long as a test wants one."""
    from pathlib import Path

    if Path(marker).exists():
        raise RuntimeError(f"cannot load: {marker} exists")
    return linear(in_shape, num_classes)
