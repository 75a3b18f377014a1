"""The serving frontend's own cost.

    python benchmarks/frontend_overhead.py [--queries 3000] [--rate 200]

Prints:
1. encode and decode time per coding group (µs), batch size 1 and 8, MNIST-sized queries;
2. p50 latency of `coded` against `none` with no faults (real worker processes running a
   trivial linear model plus 2 ms of emulated accelerator time per batch), and the added p50;
3. the most queries/s the frontend sustains with trivial models: (a) over an in-process
   backend that answers instantly (the frontend alone), (b) over the real process backend.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import numpy as np
import torch

from parm.backends import InstanceSpec, LocalBackend, ModelRef
from parm.backends.base import Backend
from parm.bench import LoadSpec, run_mode, summarize
from parm.coding import CodeConfig, encode
from parm.serving import Frontend, ServingConfig, instance_roles
from parm.serving.tracker import GroupTracker
from parm.system import SystemSpec

SHAPE = (1, 28, 28)


def _time_us(fn, repeat: int = 2000) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e6


def coding_cost(k: int, batch: int) -> tuple[float, float]:
    code = CodeConfig(k=k)
    group = torch.randn(batch, k, *SHAPE)
    encode_us = _time_us(lambda: encode(code, group)[:, 0])
    outs = [torch.randn(batch, 10) for _ in range(k)]
    parity = sum(outs)

    def decode_once() -> None:
        tracker = GroupTracker(code, time.monotonic)
        for b in range(k):
            tracker.add(b)
        for b in range(1, k):
            tracker.on_output(b, outs[b])
        tracker.on_parity(0, 0, parity)  # decodes batch 0

    tracker_us = _time_us(decode_once)
    return encode_us, tracker_us


class InstantBackend(Backend):
    """Answers every batch on the next loop iteration with zeros: the frontend's cost alone."""

    def __init__(self, roles: list[str]) -> None:
        model = ModelRef(factory="parm.models.toy:constant")
        self.instances = [InstanceSpec(i, r, model) for i, r in enumerate(roles)]

    async def start(self, on_result, on_failure, on_ready) -> None:
        self._loop, self._on_result = asyncio.get_running_loop(), on_result

    def send(self, instance_id: int, work_id: int, inputs: torch.Tensor, *, spare: bool = False) -> None:
        self._loop.call_soon(self._on_result, instance_id, work_id, torch.zeros(inputs.shape[0], 10), None)

    def healthy(self, instance_id: int) -> bool:
        return True

    def kill(self, instance_id: int, reason: str) -> None:
        pass

    async def stop(self) -> None:
        pass


async def _throughput(frontend: Frontend, total: int, window: int) -> float:
    await frontend.start()
    query = torch.zeros(*SHAPE)
    start = time.perf_counter()
    pending: set[asyncio.Future] = set()
    for _ in range(total):
        if len(pending) >= window:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        pending.add(frontend.submit(query))
    await asyncio.gather(*pending)
    rate = total / (time.perf_counter() - start)
    await frontend.stop()
    return rate


def max_throughput(mode: str, backend: str, total: int) -> float:
    roles = instance_roles(mode, 2, 2)
    if backend == "instant":
        be: Any = InstantBackend(roles)
    else:
        models = {"data": ModelRef(factory="parm.models.toy:linear", kwargs={"in_shape": SHAPE}),
                  "parity": ModelRef(factory="parm.models.toy:linear_parity", kwargs={"in_shape": SHAPE})}
        be = LocalBackend([InstanceSpec(i, r, models[r]) for i, r in enumerate(roles)])
    config = ServingConfig(SHAPE, mode=mode, k=2, max_in_flight=2)
    return asyncio.run(_throughput(Frontend(config, be), total, window=64))


def p50_coded_vs_none(queries: int, rate: float) -> dict[str, float]:
    out = {}
    for mode in ("none", "coded"):
        spec = SystemSpec(base="unused", parity="unused", instances=2, emulated_ms=2.0,
                          serving=ServingConfig(SHAPE, mode=mode, k=2))
        models = {"data": ModelRef(factory="parm.models.toy:linear", kwargs={"in_shape": SHAPE}),
                  "parity": ModelRef(factory="parm.models.toy:linear_parity", kwargs={"in_shape": SHAPE})}

        def factory(specs: list[InstanceSpec], models: dict[str, ModelRef] = models) -> Backend:
            return LocalBackend([InstanceSpec(s.instance_id, s.role, models[s.role], s.emulated_ms) for s in specs])

        summary = summarize([asyncio.run(run_mode(spec, torch.randn(256, *SHAPE), LoadSpec(queries, rate, 0, 200),
                                                  backend_factory=factory))])
        out[mode] = summary["p50_ms"]
        out[f"{mode}_p99"] = summary["p99_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="ParM frontend overhead")
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=200.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("1. coding cost per group (MNIST-sized queries, addition code)")
    for k in (2, 4):
        for batch in (1, 8):
            enc, dec = coding_cost(k, batch)
            print(f"   k={k} B={batch}: encode {enc:7.1f} us   tracker decode (incl. bookkeeping) {dec:7.1f} us")
    print(f"2. p50 with no faults, m=2, {args.queries} queries at {args.rate:g}/s, 2 ms emulated per batch")
    p = p50_coded_vs_none(args.queries, args.rate)
    print(f"   none  p50 {p['none']:.3f} ms (p99 {p['none_p99']:.3f})")
    print(f"   coded p50 {p['coded']:.3f} ms (p99 {p['coded_p99']:.3f})   added p50: "
          f"{p['coded'] - p['none']:+.3f} ms ({(p['coded'] / p['none'] - 1) * 100:+.1f}%)")
    print("3. sustained queries/s, batch size 1, trivial models, 64 queries in flight")
    for backend in ("instant", "local"):
        for mode in ("none", "coded"):
            rate = max_throughput(mode, backend, 20000 if backend == "instant" else 5000)
            print(f"   {backend:7s} backend, {mode:5s}: {rate:8.0f} q/s")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
