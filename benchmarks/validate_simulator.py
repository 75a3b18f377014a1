"""Does the cluster simulator predict the real system? The same small configuration, run for
real (worker processes on this machine) and simulated, should give percentiles within 10%.

    python benchmarks/validate_simulator.py [--queries 3000] [--rate 150] [--trials 2]

1. Measure the real per-batch service time (dispatch to answer, at low load, no faults) of a
   toy linear model with 5 ms of emulated accelerator time: those samples become the
   simulator's empirical service model. Then measure the real p50 at low load with no faults
   (`none`, 50 queries/s): what it adds to the median service time is the fixed per-query time
   spent outside the instances, the simulator's ``overhead_ms``. Both calibration runs are
   separate from the runs being compared.
2. Run `equal` and `coded` (m = 2, k = 2) for real and in the simulator with the same load,
   the same seeded background-load episodes and the same trials; print p50 / p99 / p99.9 of
   both and their relative differences.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time

import numpy as np
import torch

from parm.backends import InstanceSpec, LocalBackend, ModelRef
from parm.bench import LoadSpec, run_mode, summarize
from parm.bench.histogram import LatencyHistogram
from parm.bench.simulate import SIM_QUERY_SHAPE, ServiceModel, simulate
from parm.faults import parse_fault_spec
from parm.serving import Frontend, ServingConfig, instance_roles
from parm.system import SystemSpec

SHAPE = (1, 28, 28)
EMULATED_MS = 5.0
FAULTS = "slow:rate_hz=0.2,duration_s=1,factor=10;seed=3"
MODELS = {"data": ModelRef(factory="parm.models.toy:linear", kwargs={"in_shape": SHAPE}),
          "parity": ModelRef(factory="parm.models.toy:linear_parity", kwargs={"in_shape": SHAPE})}


def _backend(specs: list[InstanceSpec]) -> LocalBackend:
    """The spec's instances (with their fault schedules) running the toy models."""
    return LocalBackend([dataclasses.replace(s, model=MODELS[s.role], emulated_ms=EMULATED_MS) for s in specs])


async def measure_service_ms(n: int = 400) -> list[float]:
    """Per-batch service time at low load (one batch in flight at a time), no faults."""
    roles = instance_roles("none", 2, 2)
    frontend = Frontend(ServingConfig(SHAPE, mode="none", max_in_flight=1),
                        _backend([InstanceSpec(i, r, MODELS[r]) for i, r in enumerate(roles)], None))
    await frontend.start()
    for _ in range(n):
        await frontend.submit(torch.zeros(*SHAPE))
        await asyncio.sleep(0.002)
    samples = list(frontend._service_ms)
    await frontend.stop()
    return samples


def real(mode: str, queries: int, rate: float, trials: int) -> dict[str, float]:
    hist = LatencyHistogram()
    for trial in range(trials):
        spec = SystemSpec(base="toy", parity="toy", instances=2, emulated_ms=EMULATED_MS,
                          faults=parse_fault_spec(FAULTS).for_trial(trial), serving=ServingConfig(SHAPE, mode=mode, k=2))
        sink = asyncio.run(run_mode(spec, torch.randn(256, *SHAPE), LoadSpec(queries, rate, trial, 200),
                                    backend_factory=_backend))
        hist.record_many([r.latency_ms for r in sink.records if r.index >= 200 and r.outcome == "ok"])
    return hist.summary()


def simulated(mode: str, service: ServiceModel, queries: int, rate: float, trials: int) -> dict[str, float]:
    hist = LatencyHistogram()
    for trial in range(trials):
        simulate(ServingConfig(SIM_QUERY_SHAPE, mode=mode, k=2), instance_roles(mode, 2, 2), service,
                 queries=queries, rate_qps=rate, faults=parse_fault_spec(FAULTS).for_trial(trial), seed=trial, warmup=200,
                 histogram=hist)
    return hist.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description="simulator vs real system")
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=150.0)
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()
    samples = asyncio.run(measure_service_ms())
    idle = SystemSpec(base="toy", instances=2, emulated_ms=EMULATED_MS, serving=ServingConfig(SHAPE, mode="none"))
    low = summarize([asyncio.run(run_mode(idle, torch.randn(256, *SHAPE), LoadSpec(600, 50.0, 99, 100),
                                          backend_factory=_backend))])
    overhead_ms = max(0.0, low["p50_ms"] - float(np.median(samples)))
    service = ServiceModel(kind="empirical", samples_ms=tuple(samples), overhead_ms=overhead_ms)
    print(f"measured service time: median {np.median(samples):.2f} ms, p99 {np.percentile(samples, 99):.2f} ms "
          f"({len(samples)} batches); per-query time outside the instances: {overhead_ms:.2f} ms")
    print(f"m=2, k=2, {args.queries} queries at {args.rate:g}/s x {args.trials} trials (trial t: faults "
          f"{FAULTS} re-seeded by FaultSpec.for_trial(t), the same realisation real and simulated)")
    print(f"{'mode':6s} {'':5s} {'p50 ms':>8s} {'p99 ms':>8s} {'p99.9 ms':>9s}")
    for mode in ("equal", "coded"):
        started = time.monotonic()
        r = real(mode, args.queries, args.rate, args.trials)
        s = simulated(mode, service, args.queries, args.rate, args.trials)
        for name, v in (("real", r), ("sim", s)):
            print(f"{mode:6s} {name:5s} {v['p50_ms']:8.2f} {v['p99_ms']:8.2f} {v['p999_ms']:9.2f}")
        diffs = [(s[key] - r[key]) / r[key] * 100 for key in ("p50_ms", "p99_ms", "p999_ms")]
        print(f"{mode:6s} {'diff':5s} {diffs[0]:+7.1f}% {diffs[1]:+7.1f}% {diffs[2]:+8.1f}%   "
              f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
