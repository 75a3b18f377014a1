"""Open-loop load: the one driver that real runs (``parm bench``, ``parm demo``) and the cluster
simulator both use, and the sinks it reports each query's outcome to.

The driver never waits for answers before sending the next query, and latency is measured
from when a query was *scheduled* to be sent — so a stalled server cannot hide its own delay
by slowing the sender down (no coordinated omission). A run always ends on time: a query with
neither an answer nor an error ``answer_timeout_s`` after the last scheduled send is ``lost``
(latency +∞), and whatever comes for it later is ignored.

Where the outcomes go is the caller's choice of sink: :class:`RecordSink` keeps one
:class:`QueryResult` per query (records CSV, accuracy), :class:`HistogramSink` streams latencies
into a :class:`LatencyHistogram` (the simulator's millions of queries in constant memory). Both
count the outcomes of the measured queries (past the warmup) the same way;
:func:`parm.bench.stats.summarize` turns either into a summary.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from parm.bench.histogram import LatencyHistogram
from parm.errors import ConfigError, ServingError
from parm.serving.types import Prediction

GRACE_S = 5.0  # a query still unanswered this long past its deadline is lost (the frontend failed to fail it)
OUTCOMES = ("ok", "error", "rejected", "lost")


def answer_timeout_s(deadline_ms: float) -> float:
    """How long after the last scheduled send a run waits for outcomes: the frontend's deadline,
    by which it fails every query itself, plus GRACE_S."""
    return deadline_ms / 1e3 + GRACE_S


@dataclass(frozen=True)
class Spike:
    """A burst of load: from ``at_s`` after the first send, for ``duration_s``, arrivals come
    ``factor`` times faster (the same queries, compressed in time; after the spike the base rate)."""

    at_s: float
    duration_s: float
    factor: float

    def __post_init__(self) -> None:
        if not (self.at_s >= 0 and self.duration_s > 0 and self.factor >= 1):
            raise ConfigError(f"a spike needs at_s >= 0, duration_s > 0 and factor >= 1; got {self}", field="spike",
                              value=self)

    def warp(self, base_s: np.ndarray) -> np.ndarray:
        """Arrival times of the spiked process from those of the base one (a time change of the
        same Poisson draws: rate × factor inside [at_s, at_s + duration_s))."""
        start, inside = self.at_s, self.factor * self.duration_s  # base time the spike takes up
        return np.where(base_s < start, base_s,
                        np.where(base_s < start + inside, start + (base_s - start) / self.factor,
                                 base_s - inside + self.duration_s))


def poisson_gaps_s(n: int, rate_qps: float, seed: int, spike: Spike | None = None) -> np.ndarray:
    """Gaps (n,) in seconds between the sends of a seeded Poisson process with ``rate_qps``: the
    first query goes at once (gap 0), each next one an exponential gap after the one before. With
    ``spike``, the same draws time-changed so that the rate is ``spike.factor`` times higher during
    the spike (without one, the gaps are exactly those of the plain process)."""
    if n < 1:
        raise ConfigError(f"need n >= 1 queries; got n={n}", field="n", value=n)
    if not (rate_qps > 0 and np.isfinite(rate_qps)):
        raise ConfigError(f"need a finite rate_qps > 0; got rate_qps={rate_qps}", field="rate_qps", value=rate_qps)
    gaps = np.empty(n)  # (n,)
    gaps[0] = 0.0
    gaps[1:] = np.random.default_rng(seed).exponential(1.0 / rate_qps, size=n - 1)
    if spike is None:
        return gaps
    return np.diff(spike.warp(np.cumsum(gaps)), prepend=0.0)


def poisson_arrivals_s(n: int, rate_qps: float, seed: int) -> np.ndarray:
    """Send offsets (n,) in seconds from the first send: the running sum of :func:`poisson_gaps_s`."""
    return np.cumsum(poisson_gaps_s(n, rate_qps, seed))


@dataclass(frozen=True)
class QueryResult:
    """One query's record: times in seconds on the load generator's clock."""

    index: int
    scheduled_s: float
    sent_s: float
    answered_s: float
    source: str  # original / reconstructed / retried / approximate / error / lost
    outcome: str  # ok / error / rejected / lost
    label: int | None
    instance: int | None
    error: str | None = None

    @property
    def latency_ms(self) -> float:
        return (self.answered_s - self.scheduled_s) * 1e3


class Sink:
    """Where the driver reports each query's outcome, once. Counts the outcomes and answer sources
    of the measured queries (index >= ``warmup``); subclasses keep their latencies.

    ``sources`` counts every measured query by where its answer came from, a failed query as
    ``error`` and a lost one as ``lost``. ``restarts`` (instances that failed and came back) and
    ``resends`` (the frontend's re-sent data batches) are set by whoever ran the system;
    ``elapsed_s`` by the driver: the run's length on its clock, from the first scheduled send to
    the end of the run."""

    def __init__(self, warmup: int = 0) -> None:
        self.warmup = warmup
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.sources: dict[str, int] = {}
        self.restarts: int | None = None
        self.resends: int | None = None  # data batches sent again (hedge, failure), warm-up included
        self.elapsed_s = 0.0

    def answered(self, index: int, scheduled_s: float, sent_s: float, answered_s: float,
                 prediction: Prediction) -> None:
        if index >= self.warmup:
            self._count("ok", prediction.source.value)

    def failed(self, index: int, scheduled_s: float, sent_s: float, failed_s: float, outcome: str,
               error: str) -> None:
        """``outcome``: ``error`` (failed), ``rejected`` (refused at submission) or ``lost`` (no
        outcome by the cutoff; ``failed_s`` is +∞)."""
        if index >= self.warmup:
            self._count(outcome, "lost" if outcome == "lost" else "error")

    def _count(self, outcome: str, source: str) -> None:
        self.counts[outcome] += 1
        self.sources[source] = self.sources.get(source, 0) + 1

    @property
    def queries(self) -> int:
        """Measured queries (every one has exactly one outcome)."""
        return sum(self.counts.values())

    @property
    def ok(self) -> int:
        return self.counts["ok"]

    @property
    def errors(self) -> int:
        return self.counts["error"]

    @property
    def rejected(self) -> int:
        return self.counts["rejected"]

    @property
    def lost(self) -> int:
        return self.counts["lost"]

    @property
    def failed_queries(self) -> int:
        """Measured queries that count as +∞ in the percentiles (error, rejected or lost)."""
        return self.queries - self.ok


class RecordSink(Sink):
    """Keeps every query's :class:`QueryResult`, the warmup's too (the records CSV has them all)."""

    def __init__(self, warmup: int = 0) -> None:
        super().__init__(warmup)
        self._records: list[QueryResult] = []

    def answered(self, index: int, scheduled_s: float, sent_s: float, answered_s: float,
                 prediction: Prediction) -> None:
        super().answered(index, scheduled_s, sent_s, answered_s, prediction)
        self._records.append(QueryResult(index, scheduled_s, sent_s, answered_s, prediction.source.value, "ok",
                                         prediction.label, prediction.instance))

    def failed(self, index: int, scheduled_s: float, sent_s: float, failed_s: float, outcome: str,
               error: str) -> None:
        super().failed(index, scheduled_s, sent_s, failed_s, outcome, error)
        self._records.append(QueryResult(index, scheduled_s, sent_s, failed_s, "lost" if outcome == "lost" else "error",
                                         outcome, None, None, error))

    @property
    def records(self) -> list[QueryResult]:
        """Every query's record, in send order."""
        return sorted(self._records, key=lambda r: r.index)

    def latencies_ms(self) -> list[float]:
        """The measured queries' latencies in send order, every query not answered as +∞."""
        return [r.latency_ms if r.outcome == "ok" else math.inf for r in self.records if r.index >= self.warmup]


class HistogramSink(Sink):
    """Streams the measured queries' latencies (plus ``overhead_ms``, time spent outside what was
    run) into ``histogram``: memory does not grow with the number of queries."""

    def __init__(self, warmup: int = 0, overhead_ms: float = 0.0, histogram: LatencyHistogram | None = None) -> None:
        super().__init__(warmup)
        self.overhead_ms = overhead_ms
        self.histogram = histogram if histogram is not None else LatencyHistogram()

    def answered(self, index: int, scheduled_s: float, sent_s: float, answered_s: float,
                 prediction: Prediction) -> None:
        if index >= self.warmup:
            self.histogram.record((answered_s - scheduled_s) * 1e3 + self.overhead_ms)
            self._count("ok", prediction.source.value)


SinkT = TypeVar("SinkT", bound=Sink)


class _OpenLoop:
    """One run's bookkeeping: queries sent and not yet settled, and the cutoff."""

    def __init__(self, sink: Sink, clock: Callable[[], float]) -> None:
        self.sink, self.clock = sink, clock
        self.pending: dict[int, float] = {}  # index -> scheduled time, in send order
        self.all_sent = False
        self.closed = False  # past the cutoff: late outcomes are ignored
        self.done = asyncio.Event()

    def settle(self, index: int, scheduled_s: float, sent_s: float, future: asyncio.Future) -> None:
        if self.closed or self.pending.pop(index, None) is None:
            return
        now = self.clock()
        if future.cancelled():
            self.sink.failed(index, scheduled_s, sent_s, now, "error", "cancelled")
        elif future.exception() is not None:
            self.sink.failed(index, scheduled_s, sent_s, now, "error", repr(future.exception()))
        else:
            self.sink.answered(index, scheduled_s, sent_s, now, future.result())
        if self.all_sent and not self.pending:
            self.done.set()


async def drive_open_loop(submit: Callable[[torch.Tensor], asyncio.Future],
                          queries: Sequence[torch.Tensor] | torch.Tensor,
                          gaps_s: Sequence[float] | np.ndarray, sink: SinkT, *, answer_timeout_s: float,
                          clock: Callable[[], float] = time.monotonic, lead_s: float = 0.01,
                          min_sleep_s: float = 0.0005, progress: Callable[[int], None] | None = None) -> SinkT:
    """Send ``queries[i % len(queries)]`` via ``submit`` (-> a future of a Prediction) at its
    scheduled time, ``lead_s`` after the start plus ``gaps_s[0] + … + gaps_s[i]`` (summed in order);
    report every query's outcome to ``sink``, once, and return it.

    A query refused at submission (a ServingError: overload, bad query) is ``rejected`` and the
    schedule goes on; a future that fails is an ``error``; a query still without an outcome
    ``answer_timeout_s`` after the last scheduled send is ``lost``. ``min_sleep_s``: a query due
    sooner than this is sent at once (on a real clock a shorter sleep costs more than it saves; on
    a virtual clock, 0)."""
    if not answer_timeout_s > 0:
        raise ConfigError(f"answer_timeout_s must be > 0; got {answer_timeout_s}", field="answer_timeout_s",
                          value=answer_timeout_s)
    run = _OpenLoop(sink, clock)
    start = clock() + lead_s
    scheduled = start
    for i, gap in enumerate(gaps_s.tolist() if isinstance(gaps_s, np.ndarray) else gaps_s):
        scheduled = scheduled + gap
        delay = scheduled - clock()
        if delay > min_sleep_s:
            await asyncio.sleep(delay)
        sent = clock()
        try:
            future = submit(queries[i % len(queries)])
        except ServingError as exc:  # refused: counted, and the schedule goes on
            sink.failed(i, scheduled, sent, sent, "rejected", repr(exc))
            continue
        run.pending[i] = scheduled
        future.add_done_callback(functools.partial(run.settle, i, scheduled, sent))
        if progress is not None:
            progress(i)
    run.all_sent = True
    if run.pending:
        try:
            await asyncio.wait_for(run.done.wait(), max(0.0, scheduled + answer_timeout_s - clock()))
        except asyncio.TimeoutError:
            pass
    run.closed = True
    sink.elapsed_s = clock() - start
    for index, at in run.pending.items():
        sink.failed(index, at, at, math.inf, "lost", f"no answer within answer_timeout_s={answer_timeout_s} of the "
                    "last send")
    return sink


async def run_open_loop(submit: Callable[[torch.Tensor], Any], queries: Sequence[torch.Tensor] | torch.Tensor,
                        arrivals_s: Sequence[float], *, clock: Callable[[], float] = time.monotonic,
                        answer_timeout_s: float = 60.0, progress: Callable[[int], None] | None = None
                        ) -> list[QueryResult]:
    """:func:`drive_open_loop` for a schedule of send offsets (``arrivals_s``, from the start),
    into a :class:`RecordSink`: one record per query, in send order. For scripts and tests that
    hold the frontend themselves."""
    gaps = np.diff(np.asarray(arrivals_s, dtype=np.float64), prepend=0.0)  # (n,)
    sink = await drive_open_loop(submit, queries, gaps, RecordSink(), answer_timeout_s=answer_timeout_s, clock=clock,
                                 progress=progress)
    return sink.records
