"""Run serving modes one after the other under the same load and the same fault schedule."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
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


def run_modes(system: SystemSpec, modes: list[str], inputs: torch.Tensor, labels: torch.Tensor | None,
              load: LoadSpec, *, progress: bool = False) -> dict[str, dict[str, Any]]:
    """Each mode in turn, same load and faults; the per-mode summaries by mode name."""
    results = {}
    for mode in modes:
        spec = dataclasses.replace(system, serving=dataclasses.replace(system.serving, mode=mode))
        log.info("running mode %s on %d instances", mode, len(spec.roles()))
        results[mode] = asyncio.run(run_mode(spec, inputs, labels, load, progress=progress))
    return results


def gap_ratio(summaries: dict[str, dict[str, Any]], baseline: str, mode: str = "coded") -> float | None:
    """(p99.9 − p50 of ``baseline``) / (p99.9 − p50 of ``mode``): how much smaller ParM's tail gap is.

    None when a mode is missing or the ratio is undefined: ``mode``'s gap is not finite or not
    > 0 (failed queries reach its p99.9), or the baseline's is not finite."""
    if baseline not in summaries or mode not in summaries:
        return None
    gap = lambda s: s["p999_ms"] - s["p50_ms"]  # noqa: E731
    ours, theirs = gap(summaries[mode]), gap(summaries[baseline])
    if not (math.isfinite(ours) and ours > 0 and math.isfinite(theirs)):
        return None
    return float(theirs / ours)


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    """One line per mode: instances, p50 / p99 / p99.9, reconstructed fraction, outcomes, accuracy."""
    head = f"{'mode':10s} {'inst':>4s} {'p50 ms':>8s} {'p99 ms':>8s} {'p99.9 ms':>9s} {'recon':>6s} " \
           f"{'ok':>6s} {'err':>5s} {'rej':>5s} {'lost':>4s} {'accuracy':>8s}"
    lines = [head]
    for mode, s in summaries.items():
        acc = s.get("accuracy", float("nan"))
        lines.append(f"{mode:10s} {s['instances']:4d} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f} {s['p999_ms']:9.2f} "
                     f"{s['reconstructed_fraction']:6.3f} {s.get('ok', s.get('answered', 0)):6d} {s['errors']:5d} "
                     f"{s.get('rejected', 0):5d} {s['lost']:4d} {acc:8.4f}")
    if "coded" in summaries and "equal" in summaries:
        ratio = gap_ratio(summaries, "equal")
        lines.append("coded vs equal: (p99.9 - p50) is " + ("undefined (failed queries reach p99.9)" if ratio is None
                                                            else f"{ratio:.2f}x smaller"))
    return "\n".join(lines)
