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

from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_MARGIN = 0.05


@dataclass(frozen=True)
class InputEnvelope:
    """Per-feature bounds ``lo``/``hi`` (*S) and an L2-norm bound of model inputs (see module doc)."""

    lo: torch.Tensor
    hi: torch.Tensor
    max_norm: float
    margin: float = DEFAULT_MARGIN
    # derived in __post_init__: the widened per-feature bounds as centre ± half-width (F,), the squared norm bound
    _mid: np.ndarray = field(init=False, repr=False, compare=False)
    _half: np.ndarray = field(init=False, repr=False, compare=False)
    _max_sq_norm: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.lo.shape != self.hi.shape:
            raise ValueError(f"envelope bounds differ in shape: {list(self.lo.shape)} and {list(self.hi.shape)}")
        if not self.margin >= 0 or not self.max_norm >= 0:
            raise ValueError(f"envelope margin and max_norm must be >= 0; got {self.margin}, {self.max_norm}")
        # the widened bounds as numpy, once: contains() runs for every request on the serving loop, and a
        # handful of numpy operations on one query cost a third of the same torch operations
        lo = self.lo.detach().reshape(-1).to(torch.float64).numpy()
        hi = self.hi.detach().reshape(-1).to(torch.float64).numpy()
        slack = self.margin * float(hi.max() - lo.min()) if lo.size else 0.0
        object.__setattr__(self, "_mid", ((lo + hi) / 2).astype(np.float32))  # (F,)
        object.__setattr__(self, "_half", ((hi - lo) / 2 + slack).astype(np.float32))  # (F,)
        object.__setattr__(self, "_max_sq_norm", (self.max_norm * (1 + self.margin)) ** 2)

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

    def contains(self, queries: torch.Tensor | np.ndarray) -> torch.Tensor:
        """queries (N, *S) -> (N,) bool: inside the envelope (finite, within every feature's widened
        bounds and the widened norm bound)."""
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().cpu().numpy()
        flat = np.asarray(queries, dtype=np.float32).reshape(len(queries), -1)  # (N, F)
        with np.errstate(over="ignore", invalid="ignore"):
            inside = (np.abs(flat - self._mid) <= self._half).all(axis=1)  # NaN compares false: outside
            sq_norms = np.einsum("ij,ij->i", flat, flat, dtype=np.float64)  # inf for huge values: outside
        return torch.from_numpy(inside & (sq_norms <= self._max_sq_norm))
