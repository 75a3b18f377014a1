"""Batching: queries become batches of ``batch_size`` rows, at once when full, after
``batch_wait_ms`` otherwise (zero-padded up to ``batch_size``, so every instance always sees
the same input shape)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class Batch:
    """Up to ``batch_size`` queries that travel, and are answered, together."""

    batch_id: int
    inputs: torch.Tensor  # (B, *S), zero-padded past the real queries
    futures: list[asyncio.Future]
    arrivals_s: list[float]
    created_s: float
    answered: bool = False
    timers: list[asyncio.TimerHandle] = field(default_factory=list)  # cancelled when the batch is settled


class Batcher:
    """Collects queries and hands each formed :class:`Batch` to ``on_batch``."""

    def __init__(self, batch_size: int, wait_s: float, query_shape: tuple[int, ...], clock: Callable[[], float],
                 on_batch: Callable[[Batch], None]) -> None:
        self.batch_size = batch_size
        self.wait_s = wait_s
        self.query_shape = query_shape
        self.clock = clock
        self.on_batch = on_batch
        self._pending: list[tuple[torch.Tensor, asyncio.Future, float]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._next_id = 0

    def add(self, query: torch.Tensor, future: asyncio.Future) -> None:
        """Queue one query (*S); its batch forms now if full, else within ``wait_s``."""
        self._pending.append((query, future, self.clock()))
        if len(self._pending) >= self.batch_size:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.wait_s, self.flush)

    def flush(self) -> None:
        """Form every full batch, and the partial one if its first query waited ``wait_s``."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            taken, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size:]
            inputs = torch.stack([q for q, _, _ in taken])  # (n, *S)
            if len(taken) < self.batch_size:  # zero padding up to (B, *S)
                inputs = torch.cat([inputs, inputs.new_zeros(self.batch_size - len(taken), *self.query_shape)])
            batch = Batch(self._next_id, inputs, [f for _, f, _ in taken], [t for _, _, t in taken], self.clock())
            self._next_id += 1
            self.on_batch(batch)
            if len(self._pending) < self.batch_size:
                break
        if self._pending and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.wait_s, self.flush)

    def drain(self) -> list[asyncio.Future]:
        """Stop: the futures of queries that never made it into a batch (the caller fails them)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        return [future for _, future, _ in pending]
