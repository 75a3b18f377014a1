"""Run one serving system under an open-loop load (``parm.bench.run_experiment`` runs every mode
and trial of an experiment with it)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from parm.bench.loadgen import RecordSink, Spike, answer_timeout_s, drive_open_loop, poisson_gaps_s
from parm.errors import ConfigError
from parm.system import SystemSpec, build_system

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadSpec:
    """Open-loop Poisson load: ``queries`` at ``rate_qps`` (seeded); the first ``warmup`` are discarded."""

    queries: int
    rate_qps: float
    seed: int = 0
    warmup: int = 0
    spike: Spike | None = None  # a burst of load (see :class:`parm.bench.loadgen.Spike`)

    def __post_init__(self) -> None:
        if self.queries < 1 or not self.rate_qps > 0 or not 0 <= self.warmup < self.queries:
            raise ConfigError(
                f"need queries >= 1, rate_qps > 0 and 0 <= warmup < queries; got queries={self.queries}, "
                f"rate_qps={self.rate_qps}, warmup={self.warmup}", field="load", value=self)


async def run_mode(system: SystemSpec, inputs: torch.Tensor, load: LoadSpec, *, progress: bool = False,
                   backend_factory: Callable | None = None) -> RecordSink:
    """Start ``system``, send the load (query i is ``inputs[i % len(inputs)]``), stop; returns every
    query's record (:func:`parm.bench.stats.summarize` makes the summary), with the backend's
    restart count."""
    frontend = build_system(system, backend_factory=backend_factory)
    gaps = poisson_gaps_s(load.queries, load.rate_qps, load.seed, load.spike)
    started = time.monotonic()
    await frontend.start()
    log.debug("%s started in %.2f s", system.serving.mode, time.monotonic() - started)
    bar = tqdm(total=load.queries, desc=f"{system.serving.mode:9s}", disable=not progress, unit="q", leave=False)
    try:
        frontend.backend.set_time_origin(time.time())
        sink = await drive_open_loop(frontend.submit, inputs, gaps, RecordSink(load.warmup),
                                     answer_timeout_s=answer_timeout_s(system.serving.deadline_ms),
                                     progress=lambda i: bar.update(1))
    finally:
        bar.close()
        await frontend.stop()
    sink.restarts = getattr(frontend.backend, "restarts", None)
    sink.resends = frontend.metrics.resend_count()
    return sink
