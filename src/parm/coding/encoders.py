"""Encoders: build the parity query (or queries) of a coding group. Pure tensor code."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from parm.coding.config import CodeConfig
from parm.errors import ShapeError


def _check_group_shape(config: CodeConfig, x: torch.Tensor) -> None:
    if x.dim() < 3:
        raise ShapeError(
            f"encoder input must be (groups, k, *query_shape); got shape {tuple(x.shape)}",
            expected="(G, k, ...)", got=tuple(x.shape),
        )
    if x.shape[1] != config.k:
        raise ShapeError(
            f"encoder input has {x.shape[1]} queries per group but the code has k={config.k}; "
            f"shape {tuple(x.shape)}",
            expected=config.k, got=x.shape[1],
        )
    if not torch.is_floating_point(x):
        raise ShapeError(
            f"encoder input must be a floating-point tensor; got dtype {x.dtype}",
            expected="float", got=str(x.dtype),
        )


def encode_add(config: CodeConfig, x: torch.Tensor) -> torch.Tensor:
    """P_i = Σ_j w[i, j] · X_j element-wise, for any query shape (channels stay aligned)."""
    _check_group_shape(config, x)
    if config.r == 1:
        return x.sum(dim=1, keepdim=True)  # (G, k, *S) -> (G, 1, *S): all weights are 1
    w = config.weights(dtype=x.dtype).to(x.device)  # (r, k)
    flat = x.reshape(x.shape[0], config.k, -1)  # (G, k, *S) -> (G, k, D)
    parity = torch.einsum("rk,gkd->grd", w, flat)  # (G, k, D) -> (G, r, D)
    return parity.reshape(x.shape[0], config.r, *x.shape[2:])  # (G, r, *S)


def concat_grid(k: int) -> tuple[int, int]:
    """(rows, cols) of the concat encoder's tile grid for k images: cols = ⌈√k⌉, rows = ⌈k/cols⌉
    (k = 2: 1×2; 3, 4: 2×2; 5, 6: 2×3; 7–9: 3×3; 10–12: 3×4; …)."""
    cols = math.isqrt(k - 1) + 1
    return -(-k // cols), cols


def _tile_size(config: CodeConfig, height: int, width: int) -> tuple[int, int]:
    rows, cols = concat_grid(config.k)
    th, tw = height // rows, width // cols
    if th < 1 or tw < 1:
        raise ShapeError(
            f"concat encoder with k={config.k} tiles a {rows}x{cols} grid, too many for a {height}x{width} image; "
            "use a smaller k",
            expected=f"at least {rows}x{cols} pixels", got=(height, width),
        )
    return th, tw


def encode_concat(config: CodeConfig, x: torch.Tensor) -> torch.Tensor:
    """Downsample each image and tile them, row-major, into one image of the original size.

    The grid is :func:`concat_grid` (k = 2: side by side at half width; k = 3, 4: a 2×2 grid of
    half-size images; k = 8: a 3×3 grid of 9×9 tiles for 28×28). Tiles are ⌊H/rows⌋ × ⌊W/cols⌋;
    unused tiles and the remainder rows/columns are zero. Downsampling is area averaging (by
    exactly 2 it is the mean of each 2-pixel or 2×2 block); channels stay aligned.
    """
    _check_group_shape(config, x)
    if x.dim() != 5:
        raise ShapeError(
            f"concat encoder needs images (groups, k, C, H, W); got shape {tuple(x.shape)}",
            expected="(G, k, C, H, W)", got=tuple(x.shape),
        )
    groups, k, channels, height, width = x.shape
    th, tw = _tile_size(config, height, width)
    small = F.adaptive_avg_pool2d(x.reshape(groups * k, channels, height, width), (th, tw)).reshape(
        groups, k, channels, th, tw)  # (G, k, C, H, W) -> (G, k, C, th, tw)
    out = x.new_zeros(groups, 1, channels, height, width)  # (G, 1, C, H, W)
    cols = concat_grid(k)[1]
    for j in range(k):
        row, col = divmod(j, cols)
        out[:, 0, :, row * th:(row + 1) * th, col * tw:(col + 1) * tw] = small[:, j]
    return out


def encode(config: CodeConfig, x: torch.Tensor) -> torch.Tensor:
    """Encode groups of k queries into r parity queries: (G, k, *S) -> (G, r, *S)."""
    if config.encoder == "add":
        return encode_add(config, x)
    return encode_concat(config, x)  # concat and tiles encode alike
