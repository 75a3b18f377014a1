"""Batching: queries become batches of ``batch_size`` rows, at once when full, after
``batch_wait_ms`` otherwise (zero-padded up to ``batch_size``, so every instance always sees
the same input shape).

With ``form_now`` (batch policy "idle": dynamic batching), a partial batch also forms as soon as
``form_now()`` says an instance could start it at once: at the end of the event-loop turn in
which its first query arrived (so the queries of one request, and of every request read in the
same turn, still share a batch), and whenever :meth:`form_idle` is called (the frontend calls it
when an instance frees up). At low load a query then never waits for its batch to fill; under
load the instances are busy, queries accumulate while they are, and batches fill.

Queries are batched in lanes, and a batch never mixes lanes. A lane is (coded, pool): queries
that must not be coded (outside the parity model's input envelope) have lanes of their own
(``Batch.coded`` False), so such a query never shares a batch, and hence a coding group, with
anyone else's; with tenant grouping on, each tenant is a pool of its own (``Batch.pool``), so one
tenant's queries never share a batch with another's (the coded policy keeps pools apart in its
groups too). A lane exists only while it holds queries: their number bounds the lanes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
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
    pool: Hashable = None  # who may share its coding group (tenant grouping); None: anyone
    answered: bool = False
    timers: list[asyncio.TimerHandle] = field(default_factory=list)  # cancelled when the batch is settled


class _Lane:
    __slots__ = ("pending", "timer")

    def __init__(self) -> None:
        self.pending: list[tuple[torch.Tensor, asyncio.Future, float]] = []
        self.timer: asyncio.TimerHandle | None = None


class Batcher:
    """Collects queries and hands each formed :class:`Batch` to ``on_batch``."""

    def __init__(self, batch_size: int, wait_s: float, query_shape: tuple[int, ...], clock: Callable[[], float],
                 on_batch: Callable[[Batch], None], form_now: Callable[[], bool] | None = None) -> None:
        self.batch_size = batch_size
        self.form_now = form_now
        self._form_scheduled = False
        self.wait_s = wait_s
        self.query_shape = query_shape
        self.clock = clock
        self.on_batch = on_batch
        self._lanes: dict[tuple[bool, Hashable], _Lane] = {}
        self._next_id = 0

    def add(self, query: torch.Tensor, future: asyncio.Future, *, coded: bool = True, pool: Hashable = None) -> None:
        """Queue one query (*S) in its lane; its batch forms now if full, else within ``wait_s``."""
        key = (coded, pool)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        lane.pending.append((query, future, self.clock()))
        if len(lane.pending) >= self.batch_size:
            self.flush(coded, pool)
            return
        if lane.timer is None:
            lane.timer = asyncio.get_running_loop().call_later(self.wait_s, self.flush, coded, pool)
        if self.form_now is not None and not self._form_scheduled:
            self._form_scheduled = True
            asyncio.get_running_loop().call_soon(self.form_idle)

    def form_idle(self) -> None:
        """Policy "idle": form partial batches, the lane whose first query waited longest first, while
        ``form_now()`` says one could start at once (each batch formed takes an idle instance)."""
        self._form_scheduled = False
        if self.form_now is None:
            return
        for _ in range(len(self._lanes)):  # bounded: at most one batch per lane and call
            if not self._lanes or not self.form_now():
                return
            key = min(self._lanes, key=lambda lane_key: self._lanes[lane_key].pending[0][2])
            self._form(key)

    def lanes(self) -> int:
        """Lanes holding queries now."""
        return len(self._lanes)

    def flush(self, coded: bool = True, pool: Hashable = None) -> None:
        """Form every full batch of the lane, and the partial one if its first query waited ``wait_s``."""
        self._form((coded, pool))

    def _form(self, key: tuple[bool, Hashable]) -> None:
        """Form the lane's first batch (partial or not), then every further full one."""
        coded, pool = key
        lane = self._lanes.get(key)
        if lane is None:
            return
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None
        while lane.pending:
            taken, lane.pending = lane.pending[: self.batch_size], lane.pending[self.batch_size:]
            inputs = torch.stack([q for q, _, _ in taken])  # (n, *S)
            if len(taken) < self.batch_size:  # zero padding up to (B, *S)
                inputs = torch.cat([inputs, inputs.new_zeros(self.batch_size - len(taken), *self.query_shape)])
            batch = Batch(self._next_id, inputs, [f for _, f, _ in taken], [t for _, _, t in taken], self.clock(),
                          coded=coded, pool=pool)
            self._next_id += 1
            self.on_batch(batch)
            if len(lane.pending) < self.batch_size:
                break
        if lane.pending:
            if lane.timer is None:
                lane.timer = asyncio.get_running_loop().call_later(self.wait_s, self.flush, coded, pool)
        elif self._lanes.get(key) is lane:
            del self._lanes[key]

    def drain(self) -> list[asyncio.Future]:
        """Stop: the futures of queries that never made it into a batch (the caller fails them)."""
        futures = []
        for lane in self._lanes.values():
            if lane.timer is not None:
                lane.timer.cancel()
            futures += [future for _, future, _ in lane.pending]
        self._lanes.clear()
        return futures
