"""Cluster simulator: the real frontend and tracker over simulated instances, in virtual time.

Nothing about ParM's rules is re-implemented here: :class:`parm.serving.Frontend` runs
unchanged on a :class:`VirtualTimeLoop`, over :class:`SimBackend`, whose instances are single
servers (one batch at a time, FIFO) with service times drawn from a :class:`ServiceModel` and
stretched by the same seeded fault schedules (:mod:`parm.faults`) the real instances use.
The load comes from the same open-loop driver as real runs (:mod:`parm.bench.loadgen`), into a
:class:`HistogramSink`, so memory does not grow with the number of queries.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from parm.backends.base import Backend, InstanceSpec, ModelRef
from parm.bench.histogram import LatencyHistogram
from parm.bench.loadgen import HistogramSink, Spike, answer_timeout_s, drive_open_loop, poisson_gaps_s
from parm.errors import ConfigError
from parm.faults import DEFAULT_HORIZON_S, FaultSpec, InstanceFaults, instance_schedules
from parm.serving import Frontend, ServingConfig
from parm.system import serving_config
from parm.testing import run_virtual

SIM_CLASSES = 2
SIM_QUERY_SHAPE = (1,)


@dataclass(frozen=True)
class ServiceModel:
    """Service time of one batch on one instance, in milliseconds.

    ``constant``: always ``median_ms``. ``lognormal``: median ``median_ms``, log-space sigma
    ``sigma``. ``empirical``: resampled from ``samples_ms`` (e.g. measured by ``parm bench``).
    ``per_query_ms`` is added per query in the batch; ``overhead_ms`` is added to every query's
    latency outside the instances. ``query_bytes`` / ``answer_bytes``: the size of one query and
    one answer on the wire, which network faults (``shuffle``) turn into transfer delays.
    """

    kind: str = "lognormal"
    median_ms: float = 5.0
    sigma: float = 0.1
    samples_ms: tuple[float, ...] = ()
    per_query_ms: float = 0.0
    overhead_ms: float = 0.0
    query_bytes: int = 0
    answer_bytes: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "lognormal", "empirical"):
            raise ConfigError(f"service kind must be constant, lognormal or empirical; got {self.kind!r}",
                              field="service.kind", value=self.kind)
        if self.kind == "empirical" and not self.samples_ms:
            raise ConfigError("empirical service times need samples_ms", field="service.samples_ms", value=())
        if self.query_bytes < 0 or self.answer_bytes < 0:
            raise ConfigError(f"query_bytes and answer_bytes must be >= 0; got {self.query_bytes}, {self.answer_bytes}",
                              field="service.query_bytes", value=self.query_bytes)
        if self.median_ms <= 0 or self.sigma < 0 or self.per_query_ms < 0 or self.overhead_ms < 0:
            raise ConfigError(f"service times must be positive; got median_ms={self.median_ms}, sigma={self.sigma}",
                              field="service.median_ms", value=self.median_ms)

    def sampler(self, rng: np.random.Generator) -> Callable[[int], float]:
        """A function batch_size -> service seconds."""
        samples = np.asarray(self.samples_ms, dtype=np.float64)

        def draw(batch: int) -> float:
            if self.kind == "constant":
                base = self.median_ms
            elif self.kind == "lognormal":
                base = self.median_ms * math.exp(self.sigma * rng.standard_normal())
            else:
                base = float(samples[rng.integers(len(samples))])
            return (base + self.per_query_ms * batch) / 1e3

        return draw


@dataclass
class _SimInstance:
    spec: InstanceSpec
    faults: InstanceFaults | None
    draw: Callable[[int], float]
    free_at: float = 0.0
    generation: int = 0
    healthy: bool = True
    seq: int = 0
    started_s: float = 0.0  # since the time origin: faults that began earlier do not fire again
    in_flight: set[int] = field(default_factory=set)
    crash_timer: asyncio.TimerHandle | None = None


class SimBackend(Backend):
    """Simulated instances (see module docstring). Crashed or killed instances come back after
    ``restart_s``; a stalled instance never answers until the frontend kills it."""

    def __init__(self, roles: list[str], service: ServiceModel, *, faults: FaultSpec | None = None, seed: int = 0,
                 horizon_s: float = DEFAULT_HORIZON_S, restart_s: float = 1.0,
                 holds_spare: Callable[[str], bool] | None = None) -> None:
        model = ModelRef(factory="parm.models.toy:constant")
        schedules = instance_schedules(faults, len(roles), horizon_s)
        self.instances = [InstanceSpec(i, role, model, faults=schedules[i],
                                       spare=model if holds_spare is not None and holds_spare(role) else None)
                          for i, role in enumerate(roles)]
        self.service, self.seed, self.restart_s = service, seed, restart_s
        self.t0 = 0.0
        self.restarts = 0
        self._zeros: dict[int, torch.Tensor] = {}

    async def start(self, on_result, on_failure, on_ready) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_result, self._on_failure, self._on_ready = on_result, on_failure, on_ready
        self.t0 = self._loop.time()
        self._sims = []
        for spec in self.instances:
            rng = np.random.default_rng([self.seed, spec.instance_id])
            self._sims.append(_SimInstance(spec, spec.faults, self.service.sampler(rng)))
        self._schedule_crashes()

    def set_time_origin(self, t0_wall_s: float) -> None:
        self.t0 = self._loop.time()
        self._schedule_crashes()

    def _schedule_crashes(self) -> None:
        for sim in self._sims:
            if sim.crash_timer is not None:
                sim.crash_timer.cancel()
                sim.crash_timer = None
            if sim.faults is not None and sim.faults.crash_at_s is not None:
                sim.crash_timer = self._loop.call_at(self.t0 + sim.faults.crash_at_s, self._crash_if, sim,
                                                     sim.generation)

    def _crash_if(self, sim: _SimInstance, generation: int) -> None:
        if sim.generation == generation and sim.healthy:
            assert sim.faults is not None
            sim.faults = sim.faults.after_crash()
            self._fail(sim, "injected crash")

    def send(self, instance_id: int, work_id: int, inputs: torch.Tensor, *, spare: bool = False) -> None:
        sim = self._sims[instance_id]
        now = self._loop.time()
        start = max(now, sim.free_at)
        t_rel = start - self.t0
        if sim.faults is not None and sim.faults.stalls_at(t_rel, sim.started_s):
            sim.free_at = math.inf  # silent until killed
            sim.in_flight.add(work_id)
            return
        service = sim.draw(inputs.shape[0])
        if sim.faults is not None:
            nbytes = inputs.shape[0] * (self.service.query_bytes + self.service.answer_bytes)
            service = sim.faults.service_time_s(t_rel, service, sim.seq, nbytes=nbytes)
        sim.seq += 1
        sim.free_at = start + service
        sim.in_flight.add(work_id)
        self._loop.call_at(sim.free_at, self._done, sim, sim.generation, work_id, inputs.shape[0])

    def _done(self, sim: _SimInstance, generation: int, work_id: int, batch: int) -> None:
        if generation != sim.generation:
            return
        sim.in_flight.discard(work_id)
        out = self._zeros.get(batch)
        if out is None:
            out = self._zeros[batch] = torch.zeros(batch, SIM_CLASSES)
        self._on_result(sim.spec.instance_id, work_id, out, None)

    def _fail(self, sim: _SimInstance, reason: str) -> None:
        sim.generation += 1
        sim.healthy = False
        sim.in_flight.clear()
        sim.free_at = self._loop.time()
        self.restarts += 1
        self._on_failure(sim.spec.instance_id, reason)
        self._loop.call_later(self.restart_s, self._restart, sim)

    def _restart(self, sim: _SimInstance) -> None:
        sim.healthy = True
        sim.started_s = self._loop.time() - self.t0
        sim.free_at = max(sim.free_at, self._loop.time())
        self._on_ready(sim.spec.instance_id)

    def healthy(self, instance_id: int) -> bool:
        return self._sims[instance_id].healthy

    def kill(self, instance_id: int, reason: str) -> None:
        sim = self._sims[instance_id]
        if sim.healthy:
            self._fail(sim, reason)

    async def stop(self) -> None:
        for sim in self._sims:
            sim.generation += 1


# A simulated cluster is driven up to and past saturation (the load sweeps reach 390 queries/s): its
# queues may hold work for many seconds of virtual time, and that wait must show in the tail. The
# serving defaults are set for a live server (fail a query after 10 s, restart an instance silent
# for 2 s, refuse work past 10,000 pending queries) and would turn that queueing into failures, so
# simulations run with these instead; docs/EVALUATION.md's figures were simulated with them, and an
# experiment's [simulate] keys override them.
SIM_DEADLINE_MS = 60_000.0
SIM_STALL_TIMEOUT_MS = 10_000.0
SIM_MAX_PENDING_QUERIES = 1_000_000


def sim_serving_config(mode: str, *, settings: dict[str, Any] | None = None) -> ServingConfig:
    """The ServingConfig of a simulated run: the simulation's deadline, stall timeout and overload
    limit above, then ``settings`` (ServingConfig fields: an experiment's [simulate] keys and the
    point's k and batch size); anything else is the dataclass default."""
    base = {"deadline_ms": SIM_DEADLINE_MS, "stall_timeout_ms": SIM_STALL_TIMEOUT_MS,
            "max_pending_queries": SIM_MAX_PENDING_QUERIES}
    return serving_config(SIM_QUERY_SHAPE, mode=mode, settings={**base, **(settings or {})})


async def _run(config: ServingConfig, backend: SimBackend, sink: HistogramSink, *, queries: int, rate_qps: float,
               seed: int, frontend_factory: Callable[..., Frontend] = Frontend, spike: Spike | None = None
               ) -> HistogramSink:
    """The real frontend over ``backend`` on the running (virtual-time) loop, driven open loop."""
    loop = asyncio.get_running_loop()
    frontend = frontend_factory(config, backend, clock=loop.time)  # the frontend's clock is the virtual one too
    await frontend.start()
    frontend.backend.set_time_origin(0.0)
    await drive_open_loop(frontend.submit, [torch.zeros(*SIM_QUERY_SHAPE)], poisson_gaps_s(queries, rate_qps, seed, spike),
                          sink, answer_timeout_s=answer_timeout_s(config.deadline_ms), clock=loop.time, lead_s=0.0,
                          min_sleep_s=0.0)  # virtual time: every query exactly on schedule
    await frontend.stop()
    sink.restarts = backend.restarts
    sink.resends = frontend.metrics.resend_count()
    return sink


def simulate(config: ServingConfig, roles: list[str], service: ServiceModel, *, queries: int, rate_qps: float,
             faults: FaultSpec | None = None, seed: int = 0, warmup: int = 0, restart_s: float = 1.0,
             histogram: LatencyHistogram | None = None, frontend_factory: Callable[..., Frontend] = Frontend,
             spike: Spike | None = None) -> HistogramSink:
    """Run ``queries`` Poisson arrivals through the real frontend over simulated instances; the
    latencies of queries ``warmup``.. (plus the service model's ``overhead_ms``) go into
    ``histogram`` (a new one by default), their outcomes into the returned sink.

    The run ends when every query has an outcome or, at the latest, ``deadline_ms`` + GRACE_S
    after the last arrival (virtual time, ``elapsed_s``); queries without an outcome by then are
    ``lost``. ``frontend_factory`` builds the frontend (tests pass a deliberately broken one);
    ``spike`` adds a burst of load (:class:`parm.bench.loadgen.Spike`)."""
    if config.query_shape != SIM_QUERY_SHAPE:
        raise ConfigError(f"simulated queries have shape {SIM_QUERY_SHAPE}; build the ServingConfig with it",
                          field="query_shape", value=config.query_shape)
    backend = SimBackend(roles, service, faults=faults, seed=seed, restart_s=restart_s,
                         horizon_s=max(3600.0, 10 * queries / rate_qps), holds_spare=config.holds_spare)
    sink = HistogramSink(warmup, service.overhead_ms, histogram)
    return run_virtual(_run(config, backend, sink, queries=queries, rate_qps=rate_qps, seed=seed,
                            frontend_factory=frontend_factory, spike=spike))
