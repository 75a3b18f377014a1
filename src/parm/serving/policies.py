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
- ``coded``: every batch joins a coding group (:class:`GroupTracker`); its r parity batches
  are encoded when the group is full or ``group_wait_ms`` passed (zero queries fill it; their
  output F(0) is probed at start), and up to r late or lost members are reconstructed
  (optionally only once they are late: ``reconstruct_percentile``).
- ``coded-hedge``: ``coded``, plus a hedged re-send of a batch its group could not decode
  by the hedge deadline.

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
from collections.abc import Hashable
from typing import TYPE_CHECKING

import numpy as np
import torch

from parm.coding import encode
from parm.errors import ModelFailedError
from parm.serving.batcher import Batch
from parm.serving.config import parity_role
from parm.serving.dispatch import Work
from parm.serving.tracker import Action, Answer, Cancel, GroupTracker, Resend
from parm.serving.types import Source

if TYPE_CHECKING:
    from parm.serving.frontend import Frontend

log = logging.getLogger(__name__)

HEDGE_START_MS = 50.0  # the hedge deadline until enough service times are measured
HEDGE_MIN_SAMPLES = 20
LATENCY_WINDOW = 2000  # recent service times the hedge percentile is taken over


def _finite(output: torch.Tensor) -> bool:
    return bool(torch.isfinite(output).all())


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
        self.fe.settle(batch, Source.ERROR, error=ModelFailedError(f"the model failed on this batch: {error}"))

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
    """ParM: coding groups of k batches, r parity batches per group, reconstruction of up to r
    unavailable members (see the module docstring). Partial groups are filled with zero queries,
    whose output F(0) (``_filler``) is probed once at start.

    With ``reconstruct_percentile`` p set, a reconstruction is accepted only once its batch is
    older than the p-th percentile of recent original answer times (from batch formation), or
    at once if its instance failed; until then it is held and the original is waited for, so a
    busy but healthy instance's exact answer is not replaced by an approximate one."""

    def __init__(self, frontend: Frontend) -> None:
        super().__init__(frontend)
        self.code = self.config.code
        self.tracker = GroupTracker(self.code, frontend.clock)
        self._group_inputs: dict[int, list[torch.Tensor]] = {}
        self._group_timers: dict[Hashable, asyncio.TimerHandle] = {}  # pool -> its open group's close timer
        self._filler: torch.Tensor | None = None
        self._parity_index = {parity_role(i): i for i in range(self.code.r)}
        self._formed_s: dict[int, float] = {}  # batch -> when it formed, until its original answers (bounded)
        self._answer_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)  # batch age when its original answered
        self._held: dict[int, torch.Tensor] = {}  # batch -> its reconstruction, waiting for the original
        self._failed: set[int] = set()  # batches whose original failed: a reconstruction is taken at once
        self._uncoded: set[int] = set()  # batches outside every group (queries outside the input envelope)
        self._need_original: set[int] = set()  # decoded to non-finite scores: only a real copy answers them

    async def start(self) -> None:
        zeros = torch.zeros(self.config.batch_size, *self.config.query_shape)  # (B, *S)
        self._filler = await self.fe.probe("data", zeros)  # F(0): output of the zero queries filling a group

    def stop(self) -> None:
        for timer in self._group_timers.values():
            timer.cancel()
        self._group_timers.clear()

    def group_of(self, batch_id: int) -> int | None:
        return self.tracker.group_of(batch_id)

    def on_batch(self, batch: Batch) -> None:
        if not batch.coded:  # never in a group: its inputs must not reach other queries' answers
            self._uncoded.add(batch.batch_id)
            Policy.on_batch(self, batch)
            return
        group, _, full = self.tracker.add(batch.batch_id, batch.pool)  # groups never mix pools (tenants)
        self._group_inputs.setdefault(group, []).append(batch.inputs)
        if self.config.reconstruct_percentile is not None:
            self._formed_s[batch.batch_id] = batch.created_s
            if len(self._formed_s) > 4 * LATENCY_WINDOW:  # originals that never answered (aborted copies)
                del self._formed_s[next(iter(self._formed_s))]
        self.queue_data(batch, group=group)  # data batches are never held back for encoding
        if full:
            self._cancel_timer(batch.pool)
            self._encode_group(group)
        elif batch.pool not in self._group_timers:
            self._group_timers[batch.pool] = asyncio.get_running_loop().call_later(
                self.config.group_wait_ms / 1e3, self._close_group, batch.pool)

    def _cancel_timer(self, pool: Hashable) -> None:
        timer = self._group_timers.pop(pool, None)
        if timer is not None:
            timer.cancel()

    def _close_group(self, pool: Hashable) -> None:
        self._group_timers.pop(pool, None)
        assert self._filler is not None
        gid = self.tracker.open_group(pool)
        closed = self.tracker.close(self._filler, pool)
        if closed is not None:
            self._encode_group(closed[0])
        elif gid is not None:
            self._group_inputs.pop(gid, None)  # the open group was fully answered before it closed: no parity

    def _encode_group(self, gid: int) -> None:
        members = self._group_inputs.pop(gid)
        members += [torch.zeros_like(members[0])] * (self.code.k - len(members))  # zero queries fill the group
        parity = encode(self.code, torch.stack(members, dim=1))  # k × (B, *S) -> (B, k, *S) -> (B, r, *S)
        for index in range(self.code.r):
            self.dispatcher.submit(Work(self.dispatcher.new_id(), "parity", gid, parity_role(index), parity[:, index],
                                        group=gid))

    def keeps_cancelled_output(self, work: Work) -> bool:
        return work.kind == "data"  # a late original still helps decode the rest of its group

    def on_output(self, work: Work, output: torch.Tensor) -> None:
        if work.kind == "parity":
            index = self._parity_index[work.role]
            if not _finite(output):  # a NaN/inf parity output would poison every decode of its group
                self.fe.metrics.unusable.labels("parity").inc()
                self._apply(self.tracker.on_parity_failure(work.key, index), None)
            else:
                self._apply(self.tracker.on_parity(work.key, index, output), work.instance)
            return
        if work.key in self._uncoded:
            Policy.on_output(self, work, output)
            return
        formed = self._formed_s.pop(work.key, None)
        if formed is not None and not work.retry:
            self._answer_ms.append((self.fe.clock() - formed) * 1e3)
        gid = self.tracker.group_of(work.key)
        batch = self.fe.batch(work.key)
        source = Source.RETRIED if work.retry else Source.ORIGINAL
        if not _finite(output):  # answered as it is (its non-finite rows fail), never used to decode others
            self.fe.metrics.unusable.labels("data").inc()
            self._held.pop(work.key, None)
            self._need_original.discard(work.key)
            if batch is not None:
                self.fe.settle(batch, source, output, work.instance)
            self._apply(self.tracker.on_unusable(work.key), None)
            return
        self._apply(self.tracker.on_output(work.key, output, retried=work.retry), work.instance)
        held = self._held.pop(work.key, None)
        needed = work.key in self._need_original
        if (held is not None or needed) and batch is not None:  # the original beat (or replaces) a reconstruction
            self.fe.settle(batch, source, output, work.instance)
        if gid is not None and not self.tracker.has_group(gid):
            # every member is answered: a still-queued parity batch is useless. Without this a
            # parity instance slowed for a while comes back to a backlog of finished groups.
            self.dispatcher.cancel("parity", gid)

    def on_model_error(self, work: Work, error: str) -> None:
        """Parity: as if its instance failed. Data: let the group decode it, or re-send once;
        a re-sent copy that fails too fails the batch (unless another copy is still running)."""
        if work.kind == "parity":
            self._apply(self.tracker.on_parity_failure(work.key, self._parity_index[work.role]), None)
            return
        if work.kind == "data" and work.key in self._uncoded:
            Policy.on_model_error(self, work, error)
            return
        batch = self.fe.batch(work.key) if work.kind == "data" else None
        if batch is None:
            return
        if not work.retry:
            self._original_failed(batch)
            return
        if self.dispatcher.holders("data", work.key):
            return
        self.fe.settle(batch, Source.ERROR, error=ModelFailedError(f"the model failed on this batch: {error}"))
        self.on_expired(work.key)

    def on_lost(self, work: Work, instance_id: int) -> None:
        if work.kind == "parity":
            self._apply(self.tracker.on_parity_failure(work.key, self._parity_index[work.role]), None)
            return
        if work.kind == "data" and work.key in self._uncoded:
            Policy.on_lost(self, work, instance_id)
            return
        batch = self.fe.batch(work.key) if work.kind == "data" else None
        if batch is not None and work.retry and self.dispatcher.holders("data", work.key):
            return  # a hedged copy died; the original is still running
        if batch is not None:
            self._original_failed(batch)

    def _original_failed(self, batch: Batch) -> None:
        if batch.batch_id in self._need_original:  # its reconstruction was unusable: run it again
            self.resend(batch.batch_id)
            return
        self._failed.add(batch.batch_id)
        held = self._held.pop(batch.batch_id, None)
        if held is not None:
            self._accept_reconstruction(batch, held)
        else:
            self._apply(self.tracker.on_failure(batch.batch_id), None)

    def on_expired(self, batch_id: int) -> None:
        self._apply(self.tracker.expire(batch_id), None)

    def on_settled(self, batch: Batch, source: Source) -> None:
        self._held.pop(batch.batch_id, None)
        self._failed.discard(batch.batch_id)
        self._uncoded.discard(batch.batch_id)
        self._need_original.discard(batch.batch_id)
        if source is Source.ERROR:  # mark its copies; a late original still helps decode the group
            self.dispatcher.cancel("data", batch.batch_id, abort_sent=False)
        elif source is not Source.RECONSTRUCTED:  # its output is known: other copies (hedges) are useless
            self.dispatcher.cancel("data", batch.batch_id)

    # ---- accepting reconstructions -------------------------------------------------------
    def _reconstruction_wait_s(self, batch: Batch) -> float:
        """How much longer a reconstruction of ``batch`` is held (0: accept it now)."""
        percentile = self.config.reconstruct_percentile
        if percentile is None or batch.batch_id in self._failed:
            return 0.0
        if len(self._answer_ms) < HEDGE_MIN_SAMPLES:
            threshold_ms = max(self.config.hedge_min_ms, HEDGE_START_MS)
        else:
            threshold_ms = max(self.config.hedge_min_ms, float(np.percentile(self._answer_ms, percentile)))
        return max(0.0, threshold_ms / 1e3 - (self.fe.clock() - batch.created_s))

    def _accept_reconstruction(self, batch: Batch, outputs: torch.Tensor) -> None:
        if self.fe.settle(batch, Source.RECONSTRUCTED, outputs, None):
            self.fe.metrics.reconstructions.inc()
        if self.dispatcher.cancel("data", batch.batch_id):
            self.fe.metrics.cancelled.inc()

    def _release(self, batch_id: int) -> None:
        batch, held = self.fe.batch(batch_id), self._held.pop(batch_id, None)
        if batch is not None and held is not None:
            self._accept_reconstruction(batch, held)

    def _apply(self, actions: list[Action], instance: int | None) -> None:
        held_now: set[int] = set()
        for action in actions:
            if isinstance(action, Answer):
                batch = self.fe.batch(action.batch_id)
                if batch is None or action.source is Source.ERROR or action.outputs is None:
                    continue  # already settled (an ERROR answer: failed by its deadline)
                if action.source is not Source.RECONSTRUCTED:
                    self.fe.settle(batch, action.source, action.outputs, instance)
                    continue
                if not _finite(action.outputs):  # wait for a real copy; keep the original running
                    self.fe.metrics.unusable.labels("reconstruction").inc()
                    self._need_original.add(batch.batch_id)
                    held_now.add(batch.batch_id)
                    if batch.batch_id in self._failed:
                        self.resend(batch.batch_id)
                    continue
                wait_s = self._reconstruction_wait_s(batch)
                if wait_s > 0:  # the original is not late yet: hold the reconstruction
                    self._held[batch.batch_id] = action.outputs
                    held_now.add(batch.batch_id)
                    batch.timers.append(asyncio.get_running_loop().call_later(wait_s, self._release, batch.batch_id))
                elif self.fe.settle(batch, action.source, action.outputs, None):
                    self.fe.metrics.reconstructions.inc()
            elif isinstance(action, Cancel):
                if action.batch_id not in held_now and self.dispatcher.cancel("data", action.batch_id):
                    self.fe.metrics.cancelled.inc()
            elif isinstance(action, Resend):
                self.resend(action.batch_id)


class CodedHedge(Coded, Hedge):
    """``coded-hedge``: ParM with a hedged fallback. Groups are decoded as in ``coded``; in
    addition a data batch still unanswered once its original has been in service longer than
    the hedge deadline (``hedge_percentile`` of recent service times, as ``hedge``) — so its
    group could not decode it: another member or the parity is late too — is re-sent to another
    data instance. The first of original, reconstruction and re-sent copy answers; the others
    are cancelled. Re-sends run on the data instances and, with ``hedge_on_parity`` (the
    default), also on the parity instances, which then hold the deployed model as a spare and
    run waiting data work before their own (:mod:`parm.serving.dispatch`, spare capacity)."""

    def on_late(self, batch: Batch, work: Work) -> None:
        if batch.batch_id in self._held:
            return  # a reconstruction is ready and will be taken at its own deadline
        super().on_late(batch, work)


POLICIES: dict[str, type[Policy]] = {"none": Single, "equal": Single, "replicate": Replicate, "hedge": Hedge,
                                     "cheap": Cheap, "coded": Coded, "coded-hedge": CodedHedge}


def make_policy(frontend: Frontend) -> Policy:
    """The policy of the frontend's mode (chosen once, at construction)."""
    return POLICIES[frontend.config.mode](frontend)
