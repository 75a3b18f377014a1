"""Run one serving system under an open-loop load and summarise it (``parm.bench.run_experiment``
runs every mode and trial of an experiment with it)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from parm.bench.loadgen import poisson_arrivals_s, run_open_loop
from parm.bench.stats import summarize
from parm.errors import ConfigError
from parm.system import SystemSpec, build_system

log = logging.getLogger(__name__)

GRACE_S = 5.0  # a query still unanswered this long past its deadline is lost (the frontend failed to fail it)


@dataclass(frozen=True)
class LoadSpec:
    """Open-loop Poisson load: ``queries`` at ``rate_qps`` (seeded); the first ``warmup`` are discarded."""

    queries: int
    rate_qps: float
    seed: int = 0
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.queries < 1 or not self.rate_qps > 0 or not 0 <= self.warmup < self.queries:
            raise ConfigError(
                f"need queries >= 1, rate_qps > 0 and 0 <= warmup < queries; got queries={self.queries}, "
                f"rate_qps={self.rate_qps}, warmup={self.warmup}", field="load", value=self)


async def run_mode(system: SystemSpec, inputs: torch.Tensor, labels: torch.Tensor | None, load: LoadSpec,
                   *, progress: bool = False, backend_factory: Callable | None = None,
                   records: list | None = None) -> dict[str, Any]:
    """Start ``system``, send the load, stop, and summarise (latency, sources, accuracy, instances).

    Every query's record (QueryResult) is appended to ``records`` when given."""
    frontend = build_system(system, backend_factory=backend_factory)
    arrivals = poisson_arrivals_s(load.queries, load.rate_qps, load.seed)
    started = time.monotonic()
    await frontend.start()
    startup_s = time.monotonic() - started
    bar = tqdm(total=load.queries, desc=f"{system.serving.mode:9s}", disable=not progress, unit="q", leave=False)
    try:
        frontend.backend.set_time_origin(time.time())
        results = await run_open_loop(frontend.submit, inputs, arrivals, progress=lambda i: bar.update(1),
                                      answer_timeout_s=system.serving.deadline_ms / 1e3 + GRACE_S)
    finally:
        bar.close()
        await frontend.stop()
    if records is not None:
        records.extend(results)
    summary = summarize(results, load.queries, labels=None if labels is None else labels.tolist(), warmup=load.warmup)
    roles = system.roles()
    summary.update(mode=system.serving.mode, instances=len(roles), roles={r: roles.count(r) for r in set(roles)},
                   startup_s=startup_s, restarts=getattr(frontend.backend, "restarts", None))
    return summary
