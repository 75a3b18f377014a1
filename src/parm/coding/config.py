"""Code configuration: how many queries are coded together (k), how many parities (r), which encoder."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from parm.errors import ConfigError

ENCODERS: tuple[str, ...] = ("add", "concat", "tiles")
"""``add``: the parity query is the (weighted) sum of the k queries and the parity model predicts
the sum of their outputs (the paper). ``concat``: the k images downsampled and tiled into one
(:func:`parm.coding.concat_grid`), the parity model again predicting the sum. ``tiles``: the same
tiled image, but the parity model predicts each member's output apart (k·C outputs), so a
missing output is read off the parity output rather than subtracted from it — errors do not add
up over the k members, and one parity output recovers any number of missing members."""


@dataclass(frozen=True)
class CodeConfig:
    """k queries coded into r parity queries with the named encoder.

    The generator coefficients ``weights()`` (shape ``(r, k)``) say how parity i combines
    the k queries (and, by training, their outputs): parity i targets Σ_j w[i, j]·F(X_j).
    Row 0 is all ones, so with r = 1 the parity model targets F(X_1) + … + F(X_k) as in the
    paper. Rows i ≥ 1 use the distinct nodes 1..k raised to the power i (a Vandermonde
    matrix), whose every square sub-matrix is invertible, so any r erasures are decodable.
    """

    k: int
    r: int = 1
    encoder: str = "add"

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 2:
            raise ConfigError(
                f"k must be an integer >= 2 (a coding group needs at least two queries); got k={self.k!r}",
                field="k", value=self.k,
            )
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"r must be an integer >= 1; got r={self.r!r}", field="r", value=self.r)
        if self.encoder not in ENCODERS:
            raise ConfigError(
                f"unknown encoder {self.encoder!r}; choose one of {', '.join(ENCODERS)}",
                field="encoder", value=self.encoder,
            )
        if self.encoder in ("concat", "tiles"):
            self._check_concat()

    def _check_concat(self) -> None:
        if self.r != 1:
            raise ConfigError(
                f"{self.encoder} encoder supports r=1 only (one tiled parity image); got r={self.r}",
                field="r", value=self.r,
            )

    @property
    def per_query(self) -> bool:
        """Whether the parity model predicts each member's output apart (k·C outputs: ``tiles``)."""
        return self.encoder == "tiles"

    def decodable(self, parities: int) -> int:
        """How many missing members ``parities`` parity outputs can recover."""
        return parities * self.k if self.per_query else parities

    def weights(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Generator coefficients, shape (r, k): w[i, j] = (j + 1) ** i (a cached tensor: do not modify)."""
        return _weights(self.k, self.r, dtype)


@functools.lru_cache(maxsize=64)
def _weights(k: int, r: int, dtype: torch.dtype) -> torch.Tensor:
    nodes = torch.arange(1, k + 1, dtype=torch.float64)  # (k,)
    powers = torch.arange(r, dtype=torch.float64)  # (r,)
    return (nodes[None, :] ** powers[:, None]).to(dtype)  # (r, k)
