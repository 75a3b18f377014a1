"""The serving frontend: batching, coding groups, encode/dispatch/decode, futures, modes.

Query path: ``submit`` -> batcher (B queries or ``batch_wait_ms``) -> data queue -> data
instances. In ``coded`` mode every batch also joins a coding group; when the group has k
batches (or ``group_wait_ms`` passed: the rest is filled with zero queries) its parity batch
is encoded and queued for the parity instances. Data batches are never held back for
encoding. Outcomes go through :class:`GroupTracker`, which answers each batch once — with the
original, or with the decoder's reconstruction as soon as k of the group's k + 1 outputs are
in — and cancels the straggler. Other modes answer with the first copy that arrives
(``replicate``: two copies; ``hedge``: a second copy after a percentile deadline; ``cheap``: the
approximate model's answer once the original is late).

Failures: a dead instance's in-flight batches are reconstructed where their group allows and
re-sent otherwise; an instance silent for ``stall_timeout_ms`` on a batch is killed (and
restarted by the backend) and handled the same way. A query still unanswered after
``deadline_ms`` fails with DeadlineExceededError. Nothing waits forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from parm.backends.base import Backend
from parm.coding import encode
from parm.errors import BadQueryError, DeadlineExceededError, OverloadedError, ServingError
from parm.serving.config import ServingConfig
from parm.serving.dispatch import Dispatcher, Work
from parm.serving.metrics import ServingMetrics
from parm.serving.tracker import Answer, Cancel, GroupTracker, Resend
from parm.serving.types import Prediction, Source

log = logging.getLogger(__name__)

STALL_CHECK_S = 0.05
HEDGE_START_MS = 50.0
LATENCY_WINDOW = 2000


@dataclass(eq=False)
class _Batch:
    batch_id: int
    inputs: torch.Tensor  # (B, *S), zero-padded past n_real
    futures: list[asyncio.Future]
    arrivals_s: list[float]
    created_s: float
    answered: bool = False
    late: bool = False  # hedge/cheap: past the percentile deadline
    approx: torch.Tensor | None = None  # cheap mode: the approximate model's output (B, C)
    timers: list[asyncio.TimerHandle] = field(default_factory=list)


@dataclass(frozen=True)
class QueryRecord:
    """One answered query: for benchmarks and accuracy (source tells failed from slow)."""

    arrival_s: float
    answered_s: float
    source: Source
    instance: int | None
    batch_id: int
    row: int


class Frontend:
    """asyncio frontend over a Backend (see module docstring). Implements PredictService."""

    def __init__(self, config: ServingConfig, backend: Backend, *, clock: Callable[[], float] = time.monotonic,
                 metrics: ServingMetrics | None = None) -> None:
        self.config = config
        self.backend = backend
        self.clock = clock
        self.metrics = metrics or ServingMetrics()
        self.code = config.code
        self.tracker = GroupTracker(self.code, clock) if config.mode == "coded" else None
        self.dispatcher = Dispatcher(backend, config.max_in_flight, config.dispatch, clock,
                                     config.stall_timeout_ms / 1e3)
        self.dispatcher.on_send = self._on_send
        self._pending: list[tuple[torch.Tensor, asyncio.Future, float]] = []
        self._batch_timer: asyncio.TimerHandle | None = None
        self._group_timer: asyncio.TimerHandle | None = None
        self._batches: dict[int, _Batch] = {}
        self._group_inputs: dict[int, list[torch.Tensor]] = {}
        self._next_batch = 0
        self._filler: torch.Tensor | None = None
        self._probes: dict[int, asyncio.Future] = {}
        self._service_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._stall_task: asyncio.Task | None = None
        self.records: list[QueryRecord] | None = None  # set to [] to keep a record per query
        self.on_answer: list[Callable[[QueryRecord, Prediction], None]] = []
        self.counts = {s: 0 for s in Source}
        self._unanswered = 0  # queries submitted and not yet answered or failed
        self._query_counters = {s: self.metrics.queries.labels(s.value) for s in Source}

    # ---- lifecycle ----------------------------------------------------------------------
    @property
    def query_shape(self) -> tuple[int, ...]:
        return self.config.query_shape

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.backend.start(self._on_result, self._on_failure, self._on_ready)
        try:
            for spec in self.backend.instances:
                self.metrics.instance_healthy.labels(str(spec.instance_id), spec.role).set(1)
            self._stall_task = asyncio.create_task(self._watch_stalls())
            if self.tracker is not None:
                zeros = torch.zeros(self.config.batch_size, *self.query_shape)  # (B, *S)
                self._filler = await self.probe("data", zeros)  # F(0): output of the zero queries filling a group
        except BaseException:
            await self.stop()  # nothing started is left running
            raise

    async def stop(self) -> None:
        """Fail every query not yet answered (nothing is left waiting), then stop the backend."""
        if self._stall_task is not None:
            self._stall_task.cancel()
        for timer in (self._batch_timer, self._group_timer):
            if timer is not None:
                timer.cancel()
        self._batch_timer = self._group_timer = None
        shutting_down = ServingError("the server is shutting down")
        pending, self._pending = self._pending, []
        for _, future, _ in pending:
            self._unanswered -= 1
            if not future.done():
                future.set_exception(shutting_down)
        for batch in list(self._batches.values()):
            self._fail_batch(batch, shutting_down)
        for future in self._probes.values():
            if not future.done():
                future.set_exception(shutting_down)
        await self.backend.stop()

    async def probe(self, role: str, inputs: torch.Tensor, timeout_s: float = 30.0) -> torch.Tensor:
        """Run ``inputs`` (B, *S) on some instance of ``role`` and return its output."""
        work = Work(self.dispatcher.new_id(), "probe", -1, role, inputs)
        future = self._loop.create_future()
        self._probes[work.work_id] = future
        self.dispatcher.submit(work)
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._probes.pop(work.work_id, None)

    def health(self) -> dict[str, Any]:
        instances = [{"id": s.instance_id, "role": s.role, "healthy": self.backend.healthy(s.instance_id),
                      "in_flight": len(self.dispatcher.instances[s.instance_id].in_flight),
                      "queued": self.dispatcher.depth(s.role)}
                     for s in self.backend.instances]
        data_ok = any(i["healthy"] for i in instances if i["role"] == "data")
        return {"ok": data_ok, "mode": self.config.mode, "instances": instances,
                "pending_queries": self.pending_queries(), "queue_depth": self.dispatcher.depth("data")}

    def pending_queries(self) -> int:
        return self._unanswered

    # ---- submission and batching ----------------------------------------------------------
    def submit(self, query: torch.Tensor) -> asyncio.Future:
        """Queue one query (*query_shape) float32; the future resolves to a Prediction."""
        if tuple(query.shape) != self.query_shape:
            raise BadQueryError(f"query has shape {list(query.shape)}; expected {list(self.query_shape)}",
                                field="inputs")
        if self.pending_queries() >= self.config.max_pending_queries:
            self.metrics.rejected.labels("overloaded").inc()
            raise self._overloaded(1)
        if query.dtype != torch.float32:
            query = query.to(torch.float32)
        future = self._loop.create_future()
        self._unanswered += 1
        self._pending.append((query, future, self.clock()))
        if len(self._pending) >= self.config.batch_size:
            self._flush_batch()
        elif self._batch_timer is None:
            self._batch_timer = self._loop.call_later(self.config.batch_wait_ms / 1e3, self._flush_batch)
        return future

    def _overloaded(self, n: int) -> OverloadedError:
        return OverloadedError(f"{self.pending_queries()} queries pending, {n} more asked (limit "
                               f"{self.config.max_pending_queries}); retry later", limit="max_pending_queries",
                               status=429)

    async def predict(self, queries: torch.Tensor) -> list[Prediction]:
        """Answer a batch of queries (N, *query_shape) — all of them or, on overload, none."""
        if self.pending_queries() + len(queries) > self.config.max_pending_queries:
            raise self._overloaded(len(queries))  # counted by the caller (the HTTP edge)
        futures = [self.submit(q) for q in queries]
        return list(await asyncio.gather(*futures))

    def _flush_batch(self) -> None:
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        while self._pending:
            taken, self._pending = self._pending[: self.config.batch_size], self._pending[self.config.batch_size:]
            inputs = torch.stack([q for q, _, _ in taken])  # (n, *S)
            if len(taken) < self.config.batch_size:  # zero padding up to (B, *S)
                inputs = torch.cat([inputs, inputs.new_zeros(self.config.batch_size - len(taken), *self.query_shape)])
            batch = _Batch(self._next_batch, inputs, [f for _, f, _ in taken], [t for _, _, t in taken], self.clock())
            self._next_batch += 1
            self._start_batch(batch)
            if len(self._pending) < self.config.batch_size:
                break
        if self._pending and self._batch_timer is None:
            self._batch_timer = self._loop.call_later(self.config.batch_wait_ms / 1e3, self._flush_batch)

    def _start_batch(self, batch: _Batch) -> None:
        self._batches[batch.batch_id] = batch
        batch.timers.append(self._loop.call_later(self.config.deadline_ms / 1e3, self._expire, batch.batch_id))
        mode = self.config.mode
        group = None
        if self.tracker is not None:
            group, _, full = self.tracker.add(batch.batch_id)
            self._group_inputs.setdefault(group, []).append(batch.inputs)
        copies = 2 if mode == "replicate" else 1
        for _ in range(copies):
            self._queue_data(batch, group=group)
        if mode == "cheap":
            self.dispatcher.submit(Work(self.dispatcher.new_id(), "cheap", batch.batch_id, "cheap", batch.inputs))
        if self.tracker is not None:
            if full:
                self._encode_group(group)
            elif self._group_timer is None:
                self._group_timer = self._loop.call_later(self.config.group_wait_ms / 1e3, self._close_group)

    def _queue_data(self, batch: _Batch, *, group: int | None = None, retry: bool = False,
                    avoid: frozenset[int] = frozenset(), front: bool = False) -> None:
        work = Work(self.dispatcher.new_id(), "data", batch.batch_id, "data", batch.inputs, group=group,
                    retry=retry, avoid=avoid)
        self.dispatcher.submit(work, front=front)

    # ---- coding -------------------------------------------------------------------------
    def _close_group(self) -> None:
        self._group_timer = None
        assert self.tracker is not None and self._filler is not None
        closed = self.tracker.close(self._filler)
        if closed is not None:
            self._encode_group(closed[0])
        else:
            self._group_inputs.clear()  # the open group was fully answered before it closed: no parity

    def _encode_group(self, gid: int) -> None:
        if self._group_timer is not None:
            self._group_timer.cancel()
            self._group_timer = None
        members = self._group_inputs.pop(gid)
        members += [torch.zeros_like(members[0])] * (self.code.k - len(members))  # zero queries fill the group
        parity = encode(self.code, torch.stack(members, dim=1))[:, 0]  # k × (B, *S) -> (B, k, *S) -> (B, *S)
        self.dispatcher.submit(Work(self.dispatcher.new_id(), "parity", gid, "parity", parity))

    # ---- outcomes -----------------------------------------------------------------------
    def _on_result(self, instance_id: int, work_id: int, output: torch.Tensor | None, error: str | None) -> None:
        work = self.dispatcher.take(instance_id, work_id, failed=error is not None or output is None)
        if work is None:
            return
        if work.sent_s is not None and work.kind == "data":
            self._service_ms.append((self.clock() - work.sent_s) * 1e3)
        if error is None and output is not None and (output.dim() != 2 or output.shape[0] != work.inputs.shape[0]):
            error = f"model output has shape {list(output.shape)}; expected [{work.inputs.shape[0]}, classes]"
        if work.kind == "probe":
            self._finish_probe(work, output, error)
        elif work.cancelled and (error is not None or output is None):
            pass  # a copy nobody needs any more failed (or was cancelled by the backend): nothing to recover
        elif error is not None or output is None:
            self._model_error(work, error or "no output")
        elif not work.cancelled or (work.kind == "data" and self.tracker is not None):
            self._dispatch_output(work, output)  # a late original still helps decode its group
        self.dispatcher.pump(work.role)  # after the outcome, so copies it made unnecessary are not sent

    def _finish_probe(self, work: Work, output: torch.Tensor | None, error: str | None) -> None:
        future = self._probes.get(work.work_id)
        if future is not None and not future.done():
            if output is None:
                future.set_exception(ServingError(f"probe failed on instance {work.instance}: {error}"))
            else:
                future.set_result(output)

    def _model_error(self, work: Work, error: str) -> None:
        """A model raised on this work. Parity: as if its instance failed. Data (coded): let the
        group decode it, or re-send once; otherwise, and in other modes once no other copy is
        still running, the batch's queries fail with the model's error."""
        log.error("model error on instance %s for %s %d: %s", work.instance, work.kind, work.key, error)
        if work.kind == "parity" and self.tracker is not None:
            self._apply(self.tracker.on_parity_failure(work.key, 0), None)
            return
        batch = self._batches.get(work.key) if work.kind == "data" else None
        if batch is None or batch.answered or work.cancelled:
            return
        if self.tracker is not None and not work.retry:
            self._apply(self.tracker.on_failure(work.key), None)
            return
        if self.tracker is None and self.dispatcher.holders("data", work.key):
            return  # another copy (replicate, hedge) may still succeed
        self._fail_batch(batch, ServingError(f"the model failed on this batch: {error}"))
        if self.tracker is not None:
            self._apply(self.tracker.expire(work.key), None)

    def _dispatch_output(self, work: Work, output: torch.Tensor) -> None:
        if work.kind == "parity":
            assert self.tracker is not None
            self._apply(self.tracker.on_parity(work.key, 0, output), work.instance)
        elif work.kind == "cheap":
            self._on_cheap(work.key, output)
        elif self.tracker is not None:
            gid = self.tracker.group_of(work.key)
            self._apply(self.tracker.on_output(work.key, output), work.instance)
            self._drop_unneeded_parity(gid)
        else:
            batch = self._batches.get(work.key)
            if batch is not None and not batch.answered:
                self._answer(batch, output, Source.RETRIED if work.retry else Source.ORIGINAL, work.instance)
                self.dispatcher.cancel("data", batch.batch_id)

    def _drop_unneeded_parity(self, gid: int | None) -> None:
        """Every member of the group is answered: its parity batch, if still queued, is useless.

        Without this a parity instance slowed for a while comes back to a backlog of parity
        batches for finished groups, and fresh groups wait behind it.
        """
        if gid is not None and self.tracker is not None and not self.tracker.has_group(gid):
            self.dispatcher.cancel("parity", gid)

    def _apply(self, actions: list, instance: int | None) -> None:
        for action in actions:
            if isinstance(action, Answer):
                batch = self._batches.get(action.batch_id)
                if batch is None:
                    continue
                if action.source is Source.ERROR:
                    continue  # already failed by _expire
                self._answer(batch, action.outputs, action.source,
                             None if action.source is Source.RECONSTRUCTED else instance)
            elif isinstance(action, Cancel):
                if self.dispatcher.cancel("data", action.batch_id):
                    self.metrics.cancelled.inc()
            elif isinstance(action, Resend):
                self._resend(action.batch_id)

    def _resend(self, batch_id: int, avoid: frozenset[int] = frozenset()) -> None:
        batch = self._batches.get(batch_id)
        if batch is None or batch.answered:
            return
        group = self.tracker.group_of(batch_id) if self.tracker is not None else None
        self._queue_data(batch, group=group, retry=True, avoid=avoid, front=True)

    def _on_failure(self, instance_id: int, reason: str) -> None:
        spec = self.backend.instances[instance_id]
        self.metrics.instance_healthy.labels(str(instance_id), spec.role).set(0)
        self.metrics.instance_restarts.labels(str(instance_id)).inc()
        for work in self.dispatcher.drain(instance_id):
            self._recover(work, instance_id)
        self.dispatcher.pump(spec.role)

    def _recover(self, work: Work, instance_id: int) -> None:
        if work.cancelled:
            return
        if work.kind == "probe":
            self.dispatcher.submit(Work(work.work_id, "probe", -1, work.role, work.inputs, avoid=frozenset({instance_id})),
                                   front=True)
        elif work.kind == "parity":
            assert self.tracker is not None
            self._apply(self.tracker.on_parity_failure(work.key, 0), None)
        elif work.kind == "data" and self.tracker is not None:
            self._apply(self.tracker.on_failure(work.key), None)
        elif work.kind == "data":
            self._resend(work.key, avoid=frozenset({instance_id}))

    def _on_ready(self, instance_id: int) -> None:
        spec = self.backend.instances[instance_id]
        self.metrics.instance_healthy.labels(str(instance_id), spec.role).set(1)
        self.dispatcher.pump(spec.role)

    async def _watch_stalls(self) -> None:
        timeout_s = self.config.stall_timeout_ms / 1e3
        while True:
            await asyncio.sleep(STALL_CHECK_S)
            for instance_id in self.dispatcher.stalled(self.clock(), timeout_s):
                log.warning("instance %d has not answered for %.1f s; killing it", instance_id, timeout_s)
                self.backend.kill(instance_id, f"no answer within stall_timeout_ms={self.config.stall_timeout_ms}")
            self._update_gauges()

    # ---- hedge / cheap -------------------------------------------------------------------
    def _hedge_delay_s(self) -> float:
        if len(self._service_ms) < 20:  # too few samples for a percentile yet: a conservative start
            return max(self.config.hedge_min_ms, HEDGE_START_MS) / 1e3
        return max(self.config.hedge_min_ms, float(np.percentile(self._service_ms, self.config.hedge_percentile))) / 1e3

    def _on_send(self, work: Work) -> None:
        """A batch went to an instance. Re-sends are counted here, when they really leave; in
        hedge and cheap modes the original's lateness is timed from this moment, the same clock
        as the service times its percentile comes from."""
        if work.kind != "data":
            return
        if work.retry:
            self.metrics.resends.inc()
        elif self.config.mode in ("hedge", "cheap"):
            batch = self._batches.get(work.key)
            if batch is not None and not batch.answered:
                batch.timers.append(self._loop.call_later(self._hedge_delay_s(), self._on_late, batch.batch_id, work))

    def _on_late(self, batch_id: int, work: Work) -> None:
        """``work``, the batch's original, has been in service past the hedge deadline."""
        batch = self._batches.get(batch_id)
        if batch is None or batch.answered:
            return
        batch.late = True
        if self.config.mode == "hedge":
            if self.dispatcher.in_service(work):  # hedge only work still running, on another instance
                self._resend(batch_id, avoid=frozenset(self.dispatcher.holders("data", batch_id)))
        elif batch.approx is not None:
            self._answer(batch, batch.approx, Source.APPROXIMATE, None)
            self.dispatcher.cancel("data", batch_id)

    def _on_cheap(self, batch_id: int, output: torch.Tensor) -> None:
        batch = self._batches.get(batch_id)
        if batch is None or batch.answered:
            return
        batch.approx = output
        if batch.late:
            self._answer(batch, output, Source.APPROXIMATE, None)
            self.dispatcher.cancel("data", batch_id)

    # ---- answers ------------------------------------------------------------------------
    def _answer(self, batch: _Batch, outputs: torch.Tensor, source: Source, instance: int | None) -> None:
        if batch.answered:
            return
        batch.answered = True
        now = self.clock()
        labels = outputs.argmax(dim=-1).tolist()  # (B, C) -> (B,)
        answered = []
        for row, (future, arrival) in enumerate(zip(batch.futures, batch.arrivals_s)):
            pred = Prediction(outputs[row], labels[row], source, (now - arrival) * 1e3, instance)
            self._count(source, now - arrival)
            if not future.done():
                future.set_result(pred)
            answered.append((QueryRecord(arrival, now, source, instance, batch.batch_id, row), pred))
        if source is Source.RECONSTRUCTED:
            self.metrics.reconstructions.inc()
        self._retire(batch)
        if source is not Source.APPROXIMATE and self.config.mode == "cheap":
            self.dispatcher.cancel("cheap", batch.batch_id)
        self._report(answered)

    def _report(self, answered: list[tuple[QueryRecord, Prediction]]) -> None:
        """Records and hooks run after every future is resolved; a failing hook cannot hold a query."""
        for record, pred in answered:
            if self.records is not None:
                self.records.append(record)
            for hook in self.on_answer:
                try:
                    hook(record, pred)
                except Exception:
                    log.exception("an on_answer hook failed")

    def _count(self, source: Source, latency_s: float) -> None:
        self.counts[source] += 1
        self._unanswered -= 1
        self._query_counters[source].inc()
        self.metrics.latency.observe(latency_s)

    def _fail_batch(self, batch: _Batch, error: Exception) -> None:
        if batch.answered:
            return
        batch.answered = True
        now = self.clock()
        for row, (future, arrival) in enumerate(zip(batch.futures, batch.arrivals_s)):
            self._count(Source.ERROR, now - arrival)
            record = QueryRecord(arrival, now, Source.ERROR, None, batch.batch_id, row)
            if self.records is not None:
                self.records.append(record)
            if not future.done():
                future.set_exception(error)
        self.dispatcher.cancel("data", batch.batch_id, abort_sent=self.tracker is None)  # coded: a late original
        self.dispatcher.cancel("cheap", batch.batch_id)  # still helps decode the rest of its group
        self._retire(batch)

    def _expire(self, batch_id: int) -> None:
        batch = self._batches.get(batch_id)
        if batch is None or batch.answered:
            return
        self._fail_batch(batch, DeadlineExceededError(
            f"no answer within deadline_ms={self.config.deadline_ms}", deadline_s=self.config.deadline_ms / 1e3))
        if self.tracker is not None:
            self._apply(self.tracker.expire(batch_id), None)

    def _retire(self, batch: _Batch) -> None:
        for timer in batch.timers:
            timer.cancel()
        self._batches.pop(batch.batch_id, None)

    def _update_gauges(self) -> None:
        for role in ("data", "parity", "cheap"):
            if self.dispatcher.has_role(role):
                self.metrics.queue_depth.labels(role).set(self.dispatcher.depth(role))
        self.metrics.pending_queries.set(self.pending_queries())
