"""Batching: queries become batches of ``batch_size`` rows, at once when full, after
``batch_wait_ms`` otherwise (zero-padded up to ``batch_size``, so every instance always sees
the same input shape).

Queries that must not be coded (outside the parity model's input envelope) are batched in a
lane of their own: a batch is either all coded or all uncoded (``Batch.coded``), so such a
query never shares a batch, and hence a coding group, with anyone else's."""

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
    coded: bool = True  # False: served outside every coding group
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
        self._pending: dict[bool, list[tuple[torch.Tensor, asyncio.Future, float]]] = {True: [], False: []}
        self._timers: dict[bool, asyncio.TimerHandle | None] = {True: None, False: None}
        self._next_id = 0

    def add(self, query: torch.Tensor, future: asyncio.Future, *, coded: bool = True) -> None:
        """Queue one query (*S) in its lane; its batch forms now if full, else within ``wait_s``."""
        pending = self._pending[coded]
        pending.append((query, future, self.clock()))
        if len(pending) >= self.batch_size:
            self.flush(coded)
        elif self._timers[coded] is None:
            self._timers[coded] = asyncio.get_running_loop().call_later(self.wait_s, self.flush, coded)

    def flush(self, coded: bool = True) -> None:
        """Form every full batch of the lane, and the partial one if its first query waited ``wait_s``."""
        timer = self._timers[coded]
        if timer is not None:
            timer.cancel()
            self._timers[coded] = None
        while self._pending[coded]:
            pending = self._pending[coded]
            taken, self._pending[coded] = pending[: self.batch_size], pending[self.batch_size:]
            inputs = torch.stack([q for q, _, _ in taken])  # (n, *S)
            if len(taken) < self.batch_size:  # zero padding up to (B, *S)
                inputs = torch.cat([inputs, inputs.new_zeros(self.batch_size - len(taken), *self.query_shape)])
            batch = Batch(self._next_id, inputs, [f for _, f, _ in taken], [t for _, _, t in taken], self.clock(),
                          coded=coded)
            self._next_id += 1
            self.on_batch(batch)
            if len(self._pending[coded]) < self.batch_size:
                break
        if self._pending[coded] and self._timers[coded] is None:
            self._timers[coded] = asyncio.get_running_loop().call_later(self.wait_s, self.flush, coded)

    def drain(self) -> list[asyncio.Future]:
        """Stop: the futures of queries that never made it into a batch (the caller fails them)."""
        futures = []
        for lane in (True, False):
            timer = self._timers[lane]
            if timer is not None:
                timer.cancel()
                self._timers[lane] = None
            futures += [future for _, future, _ in self._pending[lane]]
            self._pending[lane] = []
        return futures
