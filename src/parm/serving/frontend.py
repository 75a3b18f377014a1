"""The serving frontend: queries -> :class:`Batcher` -> the mode's policy
(:mod:`parm.serving.policies`) -> :class:`Dispatcher` -> instances -> answers.

Every outcome goes to the policy; :meth:`Frontend.settle` is the single point where a batch is
answered or failed, once (the first answer wins). A query still unanswered after
``deadline_ms`` fails with DeadlineExceededError: nothing waits forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from parm.backends.base import Backend
from parm.coding import InputEnvelope
from parm.errors import (
    BadQueryError,
    ConfigError,
    DeadlineExceededError,
    ModelFailedError,
    OverloadedError,
    ServingError,
)
from parm.serving.batcher import Batch, Batcher
from parm.serving.config import CODED_MODES, ServingConfig
from parm.serving.dispatch import Dispatcher, Work
from parm.serving.health import health_report, watch_stalls
from parm.serving.metrics import ServingMetrics
from parm.serving.policies import make_policy
from parm.serving.probes import Probes
from parm.serving.types import Prediction, Source

log = logging.getLogger(__name__)


class Frontend:
    """asyncio frontend over a Backend (see module docstring). Implements PredictService."""

    def __init__(self, config: ServingConfig, backend: Backend, *, clock: Callable[[], float] = time.monotonic,
                 metrics: ServingMetrics | None = None, envelope: InputEnvelope | None = None) -> None:
        self.config = config
        # the parity model's input envelope: checked in coded modes unless config.input_envelope is "off"
        self.envelope = envelope if config.mode in CODED_MODES and config.input_envelope != "off" else None
        if self.envelope is not None and self.envelope.shape != tuple(config.query_shape):
            raise ConfigError(f"the input envelope has shape {list(self.envelope.shape)}, not the query shape "
                              f"{list(config.query_shape)}", field="envelope", value=list(self.envelope.shape))
        self.backend = backend
        self.clock = clock
        self.metrics = metrics or ServingMetrics()
        self.dispatcher = Dispatcher(backend, config.max_in_flight, config.dispatch, clock,
                                     config.stall_timeout_ms / 1e3)
        self.dispatcher.on_send = self._on_send
        form_now = (lambda: self.dispatcher.can_start("data")) if config.batch_policy == "idle" else None
        self.batcher = Batcher(config.batch_size, config.batch_wait_ms / 1e3, config.query_shape, clock,
                               self._on_batch, form_now)
        self.policy = make_policy(self)
        self._batches: dict[int, Batch] = {}  # formed and not yet settled
        self.probes = Probes(self.dispatcher)
        self._stall_task: asyncio.Task | None = None
        self._unanswered = 0  # queries submitted and not yet answered or failed
        self._reserved = 0  # queries of admitted requests not yet submitted (request_window)
        data_instances = sum(1 for spec in backend.instances if spec.role == "data")
        self.request_window = config.request_window or 2 * config.batch_size * max(1, data_instances)
        self._query_counters = {s: self.metrics.queries.labels(s.value) for s in Source}
        self._by_tenant = bool(config.tenant_header) and config.mode in CODED_MODES  # groups never mix tenants

    @property
    def query_shape(self) -> tuple[int, ...]:
        return self.config.query_shape

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.backend.start(self._on_result, self._on_failure, self._on_ready)
        try:
            for spec in self.backend.instances:
                self.metrics.instance_healthy.labels(str(spec.instance_id), spec.role).set(1)
            self._stall_task = asyncio.create_task(watch_stalls(self))
            await self.policy.start()
        except BaseException:
            await self.stop()  # nothing started is left running
            raise

    async def stop(self) -> None:
        """Fail every query not yet answered (nothing is left waiting), then stop the backend."""
        if self._stall_task is not None:
            self._stall_task.cancel()
        self.policy.stop()
        shutting_down = ServingError("the server is shutting down")
        for future in self.batcher.drain():
            self._unanswered -= 1
            if not future.done():
                future.set_exception(shutting_down)
        for batch in list(self._batches.values()):
            self.settle(batch, Source.ERROR, error=shutting_down)
        self.probes.fail_all(shutting_down)
        await self.backend.stop()

    async def probe(self, role: str, inputs: torch.Tensor, timeout_s: float = 30.0) -> torch.Tensor:
        """Run ``inputs`` (B, *S) on some instance of ``role`` and return its output."""
        return await self.probes.run(role, inputs, timeout_s)

    def health(self) -> dict[str, Any]:
        return health_report(self)

    def pending_queries(self) -> int:
        """Queries admitted and not yet answered: submitted ones and those still waiting in their request."""
        return self._unanswered + self._reserved

    def submit(self, query: torch.Tensor, *, inside: bool | None = None, tenant: str | None = None,
               _reserved: bool = False) -> asyncio.Future:
        """Queue one query (*query_shape) float32; the future resolves to a Prediction. ``inside``:
        whether it lies inside the input envelope, when the caller already checked (``predict``).
        ``tenant``: who sent it; with ``tenant_header`` set in a coded mode, queries of different
        tenants never share a batch or a coding group (None counts as the tenant "")."""
        if tuple(query.shape) != self.query_shape:
            raise BadQueryError(f"query has shape {list(query.shape)}; expected {list(self.query_shape)}",
                                field="inputs")
        if _reserved:  # admitted with its request: its place was kept
            self._reserved -= 1
        elif self.pending_queries() >= self.config.max_pending_queries:
            self.metrics.rejected.labels("overloaded").inc()
            raise self._overloaded(1)
        coded = True
        if self.envelope is not None:
            if inside is None:
                inside = bool(self.envelope.contains(query[None])[0])
            if not inside:
                coded = self._outside_envelope(1)
        future = self._loop.create_future()
        self._unanswered += 1
        pool = (tenant or "") if self._by_tenant else None
        self.batcher.add(query.to(torch.float32), future, coded=coded, pool=pool)
        return future

    def _outside_envelope(self, n: int) -> bool:
        """Count n queries outside the envelope; refuse them (``reject``) or say they go uncoded (False)."""
        if self.config.input_envelope == "reject":
            self.metrics.out_of_envelope.labels("rejected").inc(n)
            raise BadQueryError(f"{n} quer{'y lies' if n == 1 else 'ies lie'} outside the input envelope of the "
                                "parity model (values far from its training inputs: are they normalised with the "
                                "base checkpoint's mean/std?)", field="inputs")
        self.metrics.out_of_envelope.labels("uncoded").inc(n)
        return False

    def _overloaded(self, n: int) -> OverloadedError:
        return OverloadedError(f"{self.pending_queries()} queries pending, {n} more asked (limit "
                               f"{self.config.max_pending_queries}); retry later", limit="max_pending_queries",
                               status=429)

    def overloaded(self) -> bool:
        """Whether new queries would be refused now (the HTTP edge asks before reading a body)."""
        return self.pending_queries() >= self.config.max_pending_queries

    async def predict(self, queries: torch.Tensor, *, tenant: str | None = None) -> list[Prediction]:
        """Answer a batch of queries (N, *query_shape) — all of them or, on overload, none
        (``tenant``: see :meth:`submit`)."""
        if len(queries) > self.config.max_pending_queries:  # could never be admitted: not a retry-later
            raise BadQueryError(f"the request holds {len(queries)} queries but the server keeps at most "
                                f"max_pending_queries={self.config.max_pending_queries} pending; send fewer per request",
                                field="inputs", status=413)
        if self.pending_queries() + len(queries) > self.config.max_pending_queries:
            raise self._overloaded(len(queries))  # counted by the caller (the HTTP edge)
        inside: list[bool | None] = [None] * len(queries)
        if self.envelope is not None:  # one vectorised check for the whole request; a rejected one queues nothing
            checked: list[bool] = self.envelope.contains(queries).tolist()
            if self.config.input_envelope == "reject" and not all(checked):
                self._outside_envelope(len(checked) - sum(checked))
            inside = list(checked)
        if len(queries) <= self.request_window:
            futures = [self.submit(q, inside=ok, tenant=tenant) for q, ok in zip(queries, inside)]
            return list(await asyncio.gather(*futures))
        return await self._predict_windowed(queries, inside, tenant)

    async def _predict_windowed(self, queries: torch.Tensor, inside: list[bool | None],
                                tenant: str | None) -> list[Prediction]:
        """A request larger than ``request_window``: admitted whole (its places are reserved, so it is
        answered all or, on overload, not at all), but at most ``request_window`` of its queries are
        submitted at once; each answer lets the next one in. Other requests' queries thus never wait
        behind more than a window of this one's, whatever its size. The first failure fails the request."""
        n = len(queries)
        self._reserved += n
        results: list[Prediction | None] = [None] * n
        index: dict[asyncio.Future, int] = {}
        waiting: set[asyncio.Future] = set()
        sent = 0
        try:
            while sent < n or waiting:
                while sent < n and len(waiting) < self.request_window:
                    future = self.submit(queries[sent], inside=inside[sent], tenant=tenant, _reserved=True)
                    index[future] = sent
                    waiting.add(future)
                    sent += 1
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    results[index.pop(future)] = future.result()  # raises: the request fails
        finally:
            self._reserved -= n - sent  # never submitted: their places are free again
            for future in waiting:  # answered later, read by nobody: no "exception never retrieved"
                future.add_done_callback(_consume)
        return results  # type: ignore[return-value]

    def _on_batch(self, batch: Batch) -> None:
        self._batches[batch.batch_id] = batch
        batch.timers.append(self._loop.call_later(self.config.deadline_ms / 1e3, self._expire, batch.batch_id))
        self.policy.on_batch(batch)

    def batch(self, batch_id: int) -> Batch | None:
        """The batch, if it is still unanswered."""
        return self._batches.get(batch_id)

    def settle(self, batch: Batch, source: Source, outputs: torch.Tensor | None = None, instance: int | None = None,
               *, error: Exception | None = None) -> bool:
        """Answer the batch with ``outputs`` (B, C) — or fail it with ``error`` — unless it is
        already settled: the one first-wins point. Returns whether this call settled it."""
        if batch.answered:
            return False
        batch.answered = True
        now = self.clock()
        labels = outputs.argmax(dim=-1).tolist() if outputs is not None else []  # (B, C) -> (B,)
        finite = torch.isfinite(outputs).all(dim=-1).tolist() if outputs is not None else []  # (B,)
        for row, (future, arrival) in enumerate(zip(batch.futures, batch.arrivals_s)):
            self._unanswered -= 1
            self._query_counters[source if outputs is None or finite[row] else Source.ERROR].inc()
            self.metrics.latency.observe(now - arrival)
            if future.done():
                continue
            if outputs is None:
                future.set_exception(error or ServingError("no answer"))
            elif not finite[row]:  # never a NaN/inf score in an answer (nor in JSON)
                self.metrics.non_finite.inc()
                future.set_exception(_non_finite(source))
            else:
                future.set_result(Prediction(outputs[row], labels[row], source, (now - arrival) * 1e3, instance))
        for timer in batch.timers:
            timer.cancel()
        self._batches.pop(batch.batch_id, None)
        self.policy.on_settled(batch, source)
        return True

    def _on_send(self, work: Work) -> None:
        """A work left for an instance; re-sends are counted here, when they really leave."""
        if work.kind == "data" and work.retry:
            self.metrics.resends.inc()
        self.policy.on_send(work)

    def _on_result(self, instance_id: int, work_id: int, output: torch.Tensor | None, error: str | None) -> None:
        work = self.dispatcher.take(instance_id, work_id, failed=error is not None or output is None)
        if work is None:
            return
        self.policy.on_taken(work)
        if error is None and output is not None and (output.dim() != 2 or output.shape[0] != work.inputs.shape[0]):
            error = f"model output has shape {list(output.shape)}; expected [{work.inputs.shape[0]}, classes]"
        if work.kind == "probe":
            self.probes.finish(work, output, error)
        elif error is not None or output is None:
            if not work.cancelled:  # a copy nobody needs any more failed (or was cancelled): nothing to recover
                log.error("model error on instance %s for %s %d: %s", work.instance, work.kind, work.key, error)
                self.policy.on_model_error(work, error or "no output")
        elif not work.cancelled or self.policy.keeps_cancelled_output(work):
            self.policy.on_output(work, output)
        self.dispatcher.pump(work.role)  # after the outcome, so copies it made unnecessary are not sent
        if self.batcher.form_now is not None and self.batcher.lanes():
            self.batcher.form_idle()  # an instance may have freed up: start a waiting partial batch now

    def _on_failure(self, instance_id: int, reason: str) -> None:
        spec = self.backend.instances[instance_id]
        self.metrics.instance_healthy.labels(str(instance_id), spec.role).set(0)
        self.metrics.instance_restarts.labels(str(instance_id)).inc()
        for work in self.dispatcher.drain(instance_id):
            if work.cancelled:
                continue
            if work.kind == "probe":
                self.probes.resend(work, instance_id)
            else:
                self.policy.on_lost(work, instance_id)
        self.dispatcher.pump(spec.role)

    def _on_ready(self, instance_id: int) -> None:
        spec = self.backend.instances[instance_id]
        self.metrics.instance_healthy.labels(str(instance_id), spec.role).set(1)
        self.dispatcher.pump(spec.role)
        if self.batcher.form_now is not None and self.batcher.lanes():
            self.batcher.form_idle()

    def _expire(self, batch_id: int) -> None:
        batch = self._batches.get(batch_id)
        if batch is not None:
            self.settle(batch, Source.ERROR, error=DeadlineExceededError(
                f"no answer within deadline_ms={self.config.deadline_ms}", deadline_s=self.config.deadline_ms / 1e3))
            self.policy.on_expired(batch_id)


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _non_finite(source: Source) -> ModelFailedError:
    if source is Source.RECONSTRUCTED:  # not this query's fault: its group's parity output was unusable
        return ModelFailedError("the reconstruction of this query was not finite; retry it", status=500,
                                kind="non_finite_output")
    return ModelFailedError("the model's scores for this query are not finite (NaN or inf): its values are far "
                            "outside what the model was trained on; prepare inputs with the mean/std of the base "
                            "checkpoint's record.json", status=422, kind="non_finite_output")
