"""Values that cross the serving layer's boundaries: answer sources, predictions, the service protocol."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import torch


class Source(str, Enum):
    """Where an answer came from (every query record carries one)."""

    ORIGINAL = "original"  # the deployed model's own output
    RECONSTRUCTED = "reconstructed"  # decoded from the parity output and the group's other outputs
    RETRIED = "retried"  # the deployed model's output after a re-send (hedge, failure, double erasure)
    APPROXIMATE = "approximate"  # the cheap backup model's output (mode 'cheap')
    ERROR = "error"  # no answer: the query failed (deadline)


@dataclass(frozen=True)
class Prediction:
    """The answer to one query: raw scores (C,), their argmax, where it came from, how long it took."""

    scores: torch.Tensor
    label: int
    source: Source
    latency_ms: float
    instance: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"class": self.label, "scores": self.scores.tolist(), "source": self.source.value,
                "latency_ms": round(self.latency_ms, 3)}


class PredictService(Protocol):
    """What the HTTP adapter needs from a frontend."""

    @property
    def query_shape(self) -> tuple[int, ...]:
        """Shape of one query, e.g. (1, 28, 28)."""

    async def predict(self, queries: torch.Tensor, *, tenant: str | None = None) -> list[Prediction]:
        """Answer queries (N, *query_shape) float32 sent by ``tenant`` (None: unknown); raises
        OverloadedError or DeadlineExceededError."""

    def health(self) -> dict[str, Any]:
        """{'ok': bool, 'instances': [{'id', 'role', 'zone', 'healthy', 'queued', 'in_flight'}...], ...}."""
