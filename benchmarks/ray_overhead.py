"""What the Ray Serve path costs against the embedded backend, with a trivial model.

    python benchmarks/ray_overhead.py [--queries 2000] [--rate 50] [--modes none,coded]

Same frontend, same trivial model (the toy linear model, microseconds per batch), m = 2 data
instances (+1 parity for coded), batch size 1, no faults. For each backend and mode it sends
``--queries`` queries open-loop (Poisson, ``--rate`` per second, the first 10% discarded as
warm-up) and prints p50 / p99 / p99.9 end-to-end latency, then the Ray path's added p50 and
p99.9. Needs the ray extra. The Ray numbers include the whole Serve path: handle call, router,
replica actor, the streamed "started" marker and the answer.

First it prints what one bare Serve call costs, one at a time (``--raw-calls`` of them, after as
many to warm up): a plain ``handle.remote()`` against the streamed call of two items that the
backend uses (a "started" marker, then the answer), both with a 3 KB payload and a no-op replica.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time

import numpy as np
import torch

from parm.backends import InstanceSpec, LocalBackend, ModelRef
from parm.bench.loadgen import poisson_arrivals_s, run_open_loop
from parm.serving import Frontend, ServingConfig, instance_roles

SHAPE = (1, 28, 28)


def specs(mode: str, m: int = 2, k: int = 2) -> list[InstanceSpec]:
    data = ModelRef(factory="parm.models.toy:linear", kwargs={"in_shape": SHAPE})
    parity = ModelRef(factory="parm.models.toy:linear_parity", kwargs={"in_shape": SHAPE, "k": k})
    return [InstanceSpec(i, role, parity if role == "parity" else data) for i, role in enumerate(instance_roles(mode, m, k))]


async def measure(backend_name: str, mode: str, queries: int, rate: float, seed: int) -> dict[str, float]:
    if backend_name == "ray":
        from parm.backends.ray_serve import RayServeBackend

        backend = RayServeBackend(specs(mode))
    else:
        backend = LocalBackend(specs(mode))
    frontend = Frontend(ServingConfig(SHAPE, mode=mode, k=2), backend)
    started = time.monotonic()
    await frontend.start()
    startup_s = time.monotonic() - started
    try:
        inputs = torch.randn(queries, *SHAPE, generator=torch.Generator().manual_seed(seed))
        results = await run_open_loop(frontend.submit, inputs, poisson_arrivals_s(queries, rate, seed))
    finally:
        await frontend.stop()
    kept = [r.latency_ms for r in results[queries // 10:] if r.outcome == "ok"]
    lost = sum(r.outcome != "ok" for r in results)
    p50, p99, p999 = np.percentile(kept, [50, 99, 99.9])
    return {"p50_ms": float(p50), "p99_ms": float(p99), "p999_ms": float(p999), "lost": lost, "startup_s": startup_s}


class _Echo:
    """A no-op replica: what a bare Serve call costs."""

    async def unary(self, payload: bytes) -> bytes:
        return payload

    async def streamed(self, payload: bytes):  # noqa: ANN201 - an async generator Serve streams
        yield None
        yield payload


async def raw_calls(n: int) -> dict[str, list[float]]:
    from ray import serve

    from parm.backends.ray_serve import connect

    connect(None)
    handle = serve.run(serve.deployment(_Echo).options(name="parm-bench-echo", max_ongoing_requests=8).bind(),
                       name="parm-bench-echo", route_prefix=None)
    streaming = handle.options(stream=True)
    payload = np.zeros(784, dtype=np.float32).tobytes()
    results = {}
    try:
        for name in ("unary", "streamed"):
            latencies = []
            for i in range(2 * n):  # the first n warm up
                start = time.perf_counter()
                if name == "unary":
                    await handle.unary.remote(payload)
                else:
                    stream = streaming.streamed.remote(payload)
                    await stream.__anext__()
                    await stream.__anext__()
                if i >= n:
                    latencies.append((time.perf_counter() - start) * 1e3)
            results[name] = [float(v) for v in np.percentile(latencies, [50, 99, 99.9])]
    finally:
        serve.delete("parm-bench-echo")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=50.0, help="queries per second (Poisson)")
    parser.add_argument("--modes", default="none,coded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw-calls", type=int, default=1000, help="bare Serve calls of each kind (0: skip)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    raw = asyncio.run(raw_calls(args.raw_calls)) if args.raw_calls else {}
    for name, (p50, p99, p999) in raw.items():
        print(f"bare Serve call, {name:8s}: p50 {p50:.2f} ms, p99 {p99:.2f} ms, p99.9 {p999:.2f} ms")
    results: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{args.queries} queries at {args.rate:g}/s, trivial model, m=2, batch 1 (first 10% discarded)")
    print(f"{'backend':8s} {'mode':6s} {'p50 ms':>8s} {'p99 ms':>8s} {'p99.9 ms':>9s} {'lost':>5s} {'start s':>8s}")
    for mode in args.modes.split(","):
        for backend in ("local", "ray"):
            r = asyncio.run(measure(backend, mode, args.queries, args.rate, args.seed))
            results.setdefault(mode, {})[backend] = r
            print(f"{backend:8s} {mode:6s} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['p999_ms']:9.2f} {r['lost']:5d} "
                  f"{r['startup_s']:8.1f}", flush=True)
    for mode, by in results.items():
        print(f"{mode}: Ray adds {by['ray']['p50_ms'] - by['local']['p50_ms']:.2f} ms at p50 and "
              f"{by['ray']['p999_ms'] - by['local']['p999_ms']:.2f} ms at p99.9")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "raw_calls_ms": raw, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
