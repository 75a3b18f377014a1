"""Open-loop load: precomputed Poisson arrival times, latency from each query's scheduled time.

The generator never waits for answers before sending the next query, and latency is measured
from when a query was *scheduled* to be sent — so a stalled server cannot hide its own delay
by slowing the sender down (no coordinated omission). A run always ends on time: a query with
neither an answer nor an error ``answer_timeout_s`` after the last scheduled send is recorded
as ``lost`` (latency +∞), and whatever comes for it later is ignored.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from parm.errors import ConfigError, ServingError


def poisson_arrivals_s(n: int, rate_qps: float, seed: int) -> np.ndarray:
    """Send offsets (n,) in seconds of a Poisson process with ``rate_qps``: cumulative exponential gaps."""
    if n < 1:
        raise ConfigError(f"need n >= 1 queries; got n={n}", field="n", value=n)
    if not (rate_qps > 0 and np.isfinite(rate_qps)):
        raise ConfigError(f"need a finite rate_qps > 0; got rate_qps={rate_qps}", field="rate_qps", value=rate_qps)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate_qps, size=n)  # (n,)
    return np.cumsum(gaps) - gaps[0]


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


class _Collector:
    def __init__(self, n: int, clock: Callable[[], float]) -> None:
        self.results: list[QueryResult | None] = [None] * n
        self.clock = clock
        self.done = asyncio.Event()
        self.remaining = n
        self.closed = False  # past the cutoff: late outcomes are ignored

    def finish(self, result: QueryResult) -> None:
        if self.closed or self.results[result.index] is not None:
            return
        self.results[result.index] = result
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()

    def callback(self, index: int, scheduled_s: float, sent_s: float):
        def on_done(future: asyncio.Future) -> None:
            now = self.clock()
            if future.cancelled() or future.exception() is not None:
                err = "cancelled" if future.cancelled() else repr(future.exception())
                self.finish(QueryResult(index, scheduled_s, sent_s, now, "error", "error", None, None, err))
                return
            pred = future.result()
            self.finish(QueryResult(index, scheduled_s, sent_s, now, pred.source.value, "ok", pred.label, pred.instance))
        return on_done


async def run_open_loop(submit: Callable[[torch.Tensor], Any], queries: torch.Tensor, arrivals_s: np.ndarray, *,
                        clock: Callable[[], float] = time.monotonic, answer_timeout_s: float = 60.0,
                        progress: Callable[[int], None] | None = None) -> list[QueryResult]:
    """Send ``queries[i]`` at ``start + arrivals_s[i]`` via ``submit`` (-> future). Returns one
    record per query, in order; those still unanswered ``answer_timeout_s`` after the last
    scheduled send are ``lost``."""
    if not answer_timeout_s > 0:
        raise ConfigError(f"answer_timeout_s must be > 0; got {answer_timeout_s}", field="answer_timeout_s",
                          value=answer_timeout_s)
    n = len(arrivals_s)
    collector = _Collector(n, clock)
    start = clock() + 0.01
    scheduled = start
    for i in range(n):
        scheduled = start + float(arrivals_s[i])
        delay = scheduled - clock()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        sent = clock()
        try:
            future = submit(queries[i % len(queries)])
        except ServingError as exc:
            collector.finish(QueryResult(i, scheduled, sent, sent, "error", "rejected", None, None, repr(exc)))
            continue
        future.add_done_callback(collector.callback(i, scheduled, sent))
        if progress is not None:
            progress(i)
    cutoff = scheduled + answer_timeout_s
    try:
        await asyncio.wait_for(collector.done.wait(), max(0.0, cutoff - clock()))
    except asyncio.TimeoutError:
        pass
    collector.closed = True
    return [r if r is not None else
            QueryResult(i, start + float(arrivals_s[i]), start + float(arrivals_s[i]), math.inf, "lost", "lost", None,
                        None, f"no answer within answer_timeout_s={answer_timeout_s} of the last send")
            for i, r in enumerate(collector.results)]
