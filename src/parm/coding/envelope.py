"""The input envelope: which queries are safe to code together.

A parity query adds up k clients' inputs, so one client's input reaches the other k − 1
clients' reconstructed answers. A parity model is only trained on sums of inputs like its
training inputs; a query far outside them (unnormalised pixels, a constant 10.0, 3e38, NaN)
makes every reconstruction of its group meaningless. The envelope is learned from the inputs
the parity model was trained on:

- per feature, the smallest and largest value seen (``lo``, ``hi``), widened by ``margin`` times
  the whole range (max(hi) − min(lo)), so an unusual but legitimate value passes;
- the largest L2 norm seen, widened by the factor 1 + ``margin`` (this catches an input that stays
  inside every feature's range but is far from any real one, such as all features at their maximum).

:meth:`InputEnvelope.contains` says which queries lie inside; the serving frontend codes only
those and serves the others outside every coding group (or refuses them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_MARGIN = 0.05


@dataclass(frozen=True)
class InputEnvelope:
    """Per-feature bounds ``lo``/``hi`` (*S) and an L2-norm bound of model inputs (see module doc)."""

    lo: torch.Tensor
    hi: torch.Tensor
    max_norm: float
    margin: float = DEFAULT_MARGIN

    def __post_init__(self) -> None:
        if self.lo.shape != self.hi.shape:
            raise ValueError(f"envelope bounds differ in shape: {list(self.lo.shape)} and {list(self.hi.shape)}")
        if not self.margin >= 0 or not self.max_norm >= 0:
            raise ValueError(f"envelope margin and max_norm must be >= 0; got {self.margin}, {self.max_norm}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.lo.shape)

    @classmethod
    def fit(cls, inputs: torch.Tensor, margin: float = DEFAULT_MARGIN, chunk: int = 8192) -> InputEnvelope:
        """The envelope of ``inputs`` (N, *S), read chunk by chunk (no float copy of the whole set)."""
        if len(inputs) == 0:
            raise ValueError("an envelope needs at least one input")
        lo = hi = None
        max_norm = 0.0
        for i in range(0, len(inputs), chunk):
            part = inputs[i:i + chunk].to(torch.float32)  # (n, *S)
            part_lo, part_hi = part.amin(dim=0), part.amax(dim=0)
            lo = part_lo if lo is None else torch.minimum(lo, part_lo)
            hi = part_hi if hi is None else torch.maximum(hi, part_hi)
            max_norm = max(max_norm, float(part.flatten(1).norm(dim=1).max()))
        assert lo is not None and hi is not None
        return cls(lo.contiguous(), hi.contiguous(), max_norm, margin)

    def contains(self, queries: torch.Tensor) -> torch.Tensor:
        """queries (N, *S) -> (N,) bool: inside the envelope (finite, within every feature's widened
        bounds and the widened norm bound)."""
        flat = queries.reshape(queries.shape[0], -1).to(torch.float32)  # (N, F)
        slack = self.margin * float(self.hi.max() - self.lo.min())
        lo, hi = self.lo.reshape(1, -1) - slack, self.hi.reshape(1, -1) + slack
        inside = ((flat >= lo) & (flat <= hi)).all(dim=1)  # NaN compares false: outside
        with torch.no_grad():
            norms = torch.linalg.vector_norm(flat, dim=1)  # inf for huge finite values: outside
        return inside & (norms <= self.max_norm * (1 + self.margin))
