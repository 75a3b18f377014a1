"""One policy object per serving mode: how batches are sent, and what an output, a failure or
a late batch means.

The :class:`~parm.serving.frontend.Frontend` forms batches, runs the dispatcher and settles
every batch exactly once (``Frontend.settle``, the single first-wins point); the policy chosen
once by :func:`make_policy` decides everything that differs between modes:

- ``none`` / ``equal`` (:class:`Single`): one copy per batch; a failed instance's batches are
  re-sent elsewhere.
- ``replicate``: two copies, the first answer wins.
- ``hedge``: a second copy once the original has been in service longer than a percentile of
  recent service times (timed from its send, on the same clock as those service times).
- ``cheap``: the approximate model runs every batch too; its answer is used once the original
  is late by the same rule.
- ``coded``: every batch joins a coding group (:class:`GroupTracker`); its parity batch is
  encoded when the group is full or ``group_wait_ms`` passed (zero queries fill it; their
  output F(0) is probed at start), and a late or lost member is reconstructed.

Hooks a policy implements (each returns nothing; the frontend calls them):
``on_batch`` (a batch was formed), ``on_send`` (a work left for an instance), ``on_taken`` (a
work came back, any outcome), ``on_output`` (it came back with an output), ``on_model_error``
(the model raised), ``on_lost`` (its instance died holding it), ``on_expired`` (a batch
failed its deadline), ``on_settled`` (a batch was answered or failed).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

import numpy as np
import torch

from parm.coding import encode
from parm.errors import ServingError
from parm.serving.batcher import Batch
from parm.serving.dispatch import Work
from parm.serving.tracker import Action, Answer, Cancel, GroupTracker, Resend
from parm.serving.types import Source

if TYPE_CHECKING:
    from parm.serving.frontend import Frontend

log = logging.getLogger(__name__)

HEDGE_START_MS = 50.0  # the hedge deadline until enough service times are measured
HEDGE_MIN_SAMPLES = 20
LATENCY_WINDOW = 2000  # recent service times the hedge percentile is taken over


class Policy:
    """Base policy: one copy per batch; the first output answers it (modes ``none``, ``equal``)."""

    copies = 1

    def __init__(self, frontend: Frontend) -> None:
        self.fe = frontend
        self.dispatcher = frontend.dispatcher
        self.config = frontend.config

    async def start(self) -> None:
        """Anything the mode needs from the instances before the first query."""

    def stop(self) -> None:
        """Cancel the mode's own timers."""

    def group_of(self, batch_id: int) -> int | None:
        return None

    def on_batch(self, batch: Batch) -> None:
        for _ in range(self.copies):
            self.queue_data(batch)

    def on_send(self, work: Work) -> None:
        pass

    def on_taken(self, work: Work) -> None:
        pass

    def keeps_cancelled_output(self, work: Work) -> bool:
        """Whether the output of a cancelled work still matters (default: no)."""
        return False

    def on_output(self, work: Work, output: torch.Tensor) -> None:
        batch = self.fe.batch(work.key)
        if batch is not None:
            self.fe.settle(batch, Source.RETRIED if work.retry else Source.ORIGINAL, output, work.instance)

    def on_model_error(self, work: Work, error: str) -> None:
        """The batch fails with the model's error once no other copy of it is still running."""
        batch = self.fe.batch(work.key) if work.kind == "data" else None
        if batch is None or self.dispatcher.holders("data", work.key):
            return
        self.fe.settle(batch, Source.ERROR, error=ServingError(f"the model failed on this batch: {error}"))

    def on_lost(self, work: Work, instance_id: int) -> None:
        if work.kind == "data":
            self.resend(work.key, avoid=frozenset({instance_id}))

    def on_expired(self, batch_id: int) -> None:
        pass

    def on_settled(self, batch: Batch, source: Source) -> None:
        self.dispatcher.cancel("data", batch.batch_id)  # copies still queued or running are useless now

    def queue_data(self, batch: Batch, *, group: int | None = None, retry: bool = False,
                   avoid: frozenset[int] = frozenset(), front: bool = False) -> None:
        work = Work(self.dispatcher.new_id(), "data", batch.batch_id, "data", batch.inputs, group=group,
                    retry=retry, avoid=avoid)
        self.dispatcher.submit(work, front=front)

    def resend(self, batch_id: int, avoid: frozenset[int] = frozenset()) -> None:
        """Queue another copy of a batch still unanswered, ahead of new work."""
        batch = self.fe.batch(batch_id)
        if batch is not None:
            self.queue_data(batch, group=self.group_of(batch_id), retry=True, avoid=avoid, front=True)


class Single(Policy):
    """``none`` and ``equal``: one copy per batch."""


class Replicate(Policy):
    """Every batch sent twice (to two instances); the first answer wins."""

    copies = 2


class Hedge(Policy):
    """A second copy of a batch whose original is late (see :meth:`delay_s`)."""

    def __init__(self, frontend: Frontend) -> None:
        super().__init__(frontend)
        self._service_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def delay_s(self) -> float:
        """``hedge_percentile`` of recent data service times (at least ``hedge_min_ms``)."""
        if len(self._service_ms) < HEDGE_MIN_SAMPLES:  # too few samples for a percentile yet: a conservative start
            return max(self.config.hedge_min_ms, HEDGE_START_MS) / 1e3
        return max(self.config.hedge_min_ms, float(np.percentile(self._service_ms, self.config.hedge_percentile))) / 1e3

    def on_taken(self, work: Work) -> None:
        if work.kind == "data" and work.sent_s is not None:
            self._service_ms.append((self.fe.clock() - work.sent_s) * 1e3)

    def on_send(self, work: Work) -> None:
        """The original's lateness is timed from its send, on the clock of the service times."""
        batch = self.fe.batch(work.key) if work.kind == "data" and not work.retry else None
        if batch is not None:
            loop = asyncio.get_running_loop()
            batch.timers.append(loop.call_later(self.delay_s(), self._late, batch.batch_id, work))

    def _late(self, batch_id: int, work: Work) -> None:
        batch = self.fe.batch(batch_id)
        if batch is not None:
            self.on_late(batch, work)

    def on_late(self, batch: Batch, work: Work) -> None:
        """``work``, the batch's original, is past the deadline: hedge it if it is still in
        service (never a queued one), on another instance."""
        if self.dispatcher.in_service(work):
            self.resend(batch.batch_id, avoid=frozenset(self.dispatcher.holders("data", batch.batch_id)))


class Cheap(Hedge):
    """The approximate model runs every batch; its answer is used once the original is late."""

    def __init__(self, frontend: Frontend) -> None:
        super().__init__(frontend)
        self._approx: dict[int, torch.Tensor] = {}  # batch -> the approximate model's output (B, C)
        self._late_ids: set[int] = set()

    def on_batch(self, batch: Batch) -> None:
        super().on_batch(batch)
        self.dispatcher.submit(Work(self.dispatcher.new_id(), "cheap", batch.batch_id, "cheap", batch.inputs))

    def on_late(self, batch: Batch, work: Work) -> None:
        self._late_ids.add(batch.batch_id)
        approx = self._approx.get(batch.batch_id)
        if approx is not None:
            self.fe.settle(batch, Source.APPROXIMATE, approx)

    def on_output(self, work: Work, output: torch.Tensor) -> None:
        if work.kind != "cheap":
            super().on_output(work, output)
            return
        batch = self.fe.batch(work.key)
        if batch is None:
            return
        self._approx[work.key] = output
        if work.key in self._late_ids:
            self.fe.settle(batch, Source.APPROXIMATE, output)

    def on_settled(self, batch: Batch, source: Source) -> None:
        super().on_settled(batch, source)
        if source is not Source.APPROXIMATE:
            self.dispatcher.cancel("cheap", batch.batch_id)
        self._approx.pop(batch.batch_id, None)
        self._late_ids.discard(batch.batch_id)


class Coded(Policy):
    """ParM: coding groups of k batches, a parity batch per group, reconstruction of the
    unavailable member (see the module docstring). Partial groups are filled with zero queries,
    whose output F(0) (``_filler``) is probed once at start."""

    def __init__(self, frontend: Frontend) -> None:
        super().__init__(frontend)
        self.code = self.config.code
        self.tracker = GroupTracker(self.code, frontend.clock)
        self._group_inputs: dict[int, list[torch.Tensor]] = {}
        self._group_timer: asyncio.TimerHandle | None = None
        self._filler: torch.Tensor | None = None

    async def start(self) -> None:
        zeros = torch.zeros(self.config.batch_size, *self.config.query_shape)  # (B, *S)
        self._filler = await self.fe.probe("data", zeros)  # F(0): output of the zero queries filling a group

    def stop(self) -> None:
        if self._group_timer is not None:
            self._group_timer.cancel()
            self._group_timer = None

    def group_of(self, batch_id: int) -> int | None:
        return self.tracker.group_of(batch_id)

    def on_batch(self, batch: Batch) -> None:
        group, _, full = self.tracker.add(batch.batch_id)
        self._group_inputs.setdefault(group, []).append(batch.inputs)
        self.queue_data(batch, group=group)  # data batches are never held back for encoding
        if full:
            self._encode_group(group)
        elif self._group_timer is None:
            self._group_timer = asyncio.get_running_loop().call_later(self.config.group_wait_ms / 1e3,
                                                                      self._close_group)

    def _close_group(self) -> None:
        self._group_timer = None
        assert self._filler is not None
        closed = self.tracker.close(self._filler)
        if closed is not None:
            self._encode_group(closed[0])
        else:
            self._group_inputs.clear()  # the open group was fully answered before it closed: no parity

    def _encode_group(self, gid: int) -> None:
        self.stop()
        members = self._group_inputs.pop(gid)
        members += [torch.zeros_like(members[0])] * (self.code.k - len(members))  # zero queries fill the group
        parity = encode(self.code, torch.stack(members, dim=1))[:, 0]  # k × (B, *S) -> (B, k, *S) -> (B, *S)
        self.dispatcher.submit(Work(self.dispatcher.new_id(), "parity", gid, "parity", parity))

    def keeps_cancelled_output(self, work: Work) -> bool:
        return work.kind == "data"  # a late original still helps decode the rest of its group

    def on_output(self, work: Work, output: torch.Tensor) -> None:
        if work.kind == "parity":
            self._apply(self.tracker.on_parity(work.key, 0, output), work.instance)
            return
        gid = self.tracker.group_of(work.key)
        self._apply(self.tracker.on_output(work.key, output), work.instance)
        if gid is not None and not self.tracker.has_group(gid):
            # every member is answered: a still-queued parity batch is useless. Without this a
            # parity instance slowed for a while comes back to a backlog of finished groups.
            self.dispatcher.cancel("parity", gid)

    def on_model_error(self, work: Work, error: str) -> None:
        """Parity: as if its instance failed. Data: let the group decode it, or re-send once;
        a re-sent copy that fails too fails the batch."""
        if work.kind == "parity":
            self._apply(self.tracker.on_parity_failure(work.key, 0), None)
            return
        if work.kind != "data" or self.fe.batch(work.key) is None:
            return
        if not work.retry:
            self._apply(self.tracker.on_failure(work.key), None)
            return
        batch = self.fe.batch(work.key)
        assert batch is not None
        self.fe.settle(batch, Source.ERROR, error=ServingError(f"the model failed on this batch: {error}"))
        self.on_expired(work.key)

    def on_lost(self, work: Work, instance_id: int) -> None:
        if work.kind == "parity":
            self._apply(self.tracker.on_parity_failure(work.key, 0), None)
        elif work.kind == "data":
            self._apply(self.tracker.on_failure(work.key), None)

    def on_expired(self, batch_id: int) -> None:
        self._apply(self.tracker.expire(batch_id), None)

    def on_settled(self, batch: Batch, source: Source) -> None:
        if source is Source.ERROR:  # mark its copies; a late original still helps decode the group
            self.dispatcher.cancel("data", batch.batch_id, abort_sent=False)

    def _apply(self, actions: list[Action], instance: int | None) -> None:
        for action in actions:
            if isinstance(action, Answer):
                batch = self.fe.batch(action.batch_id)
                if batch is None or action.source is Source.ERROR:
                    continue  # already settled (an ERROR answer: failed by its deadline)
                reconstructed = action.source is Source.RECONSTRUCTED
                if self.fe.settle(batch, action.source, action.outputs, None if reconstructed else instance) \
                        and reconstructed:
                    self.fe.metrics.reconstructions.inc()
            elif isinstance(action, Cancel):
                if self.dispatcher.cancel("data", action.batch_id):
                    self.fe.metrics.cancelled.inc()
            elif isinstance(action, Resend):
                self.resend(action.batch_id)


POLICIES: dict[str, type[Policy]] = {"none": Single, "equal": Single, "replicate": Replicate, "hedge": Hedge,
                                     "cheap": Cheap, "coded": Coded}


def make_policy(frontend: Frontend) -> Policy:
    """The policy of the frontend's mode (chosen once, at construction)."""
    return POLICIES[frontend.config.mode](frontend)
