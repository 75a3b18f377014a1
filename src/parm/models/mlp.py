"""Multi-layer perceptron of the paper: flatten -> 200 -> 100 -> classes, ReLU; and the tile MLP
parity model of the ``tiles`` code."""

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


class TileMLP(nn.Module):
    """Parity model for the ``tiles`` code: one small MLP, shared by every tile of the concat grid
    (:func:`parm.coding.concat_grid`), predicts each of the k tiled queries' outputs.

    (N, C, H, W) parity images -> (N, k·classes), member j's prediction in columns
    [j·classes, (j+1)·classes). ``num_classes`` is k·classes (what the parity model outputs).
    Per query it costs (C·th·tw·h1 + h1·h2 + h2·classes) multiply-adds, so the whole parity query
    costs about as much as the paper's MLP on one query for k up to 8 on 28×28 images.
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, k: int = 2,
                 hidden: tuple[int, ...] = (128, 64)) -> None:
        super().__init__()
        from parm.coding.encoders import concat_grid

        if len(in_shape) != 3:
            raise ValueError(f"tile-mlp needs image inputs (C, H, W); got in_shape {tuple(in_shape)}")
        if num_classes % k:
            raise ValueError(f"tile-mlp outputs k·classes; {num_classes} is not a multiple of k={k}")
        self.k = k
        channels, height, width = in_shape
        self.rows, self.cols = concat_grid(k)
        self.th, self.tw = height // self.rows, width // self.cols
        self.tile = MLP((channels, self.th, self.tw), num_classes // k, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, rows, cols, th, tw = x.shape[0], self.rows, self.cols, self.th, self.tw
        tiles = x[:, :, :rows * th, :cols * tw].unfold(2, th, th).unfold(3, tw, tw)  # (N, C, rows, cols, th, tw)
        tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(n, rows * cols, -1, th, tw)[:, : self.k]  # (N, k, C, th, tw)
        return self.tile(tiles.reshape(n * self.k, -1, th, tw)).reshape(n, -1)  # (N·k, classes) -> (N, k·classes)
