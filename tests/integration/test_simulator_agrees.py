"""The cluster simulator and the real frontend agree: one scripted scenario driven through the
real Frontend twice, once over simulated instances on the virtual clock and once over a fake
backend on the wall clock (which is why it is an integration test: it takes real time)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from fakes import FakeBackend, specs_for
from parm.bench.simulate import SIM_QUERY_SHAPE, ServiceModel, SimBackend
from parm.faults import parse_fault_spec
from parm.serving import Frontend, ServingConfig, instance_roles
from parm.serving.types import Prediction, Source
from parm.testing import run_virtual

SERVICE_S = 0.003
STRAGGLER = 1  # data instance 1 is 100x slower: 300 ms per batch
SCHEDULE = [(0.00, 2), (0.05, 1), (0.10, 2), (0.70, 2), (0.75, 1)]  # (send at s, queries sent back to back)
# In a pair (one coding group) one batch lands on instance 0 and the other on the straggler,
# whose batch the decoder reconstructs from the parity at once. A single query waits alone for
# its group (closed with a filler after group_wait_ms) and is answered by instance 0. The gap
# before 0.70 s lets the straggler finish what it holds, so it never holds 2 batches and nothing
# is pushed onto instance 0 behind another batch. Every outcome is decided by the order of
# timers, not by how fast the machine is.
PAIRS, SINGLES = [(0, 1), (3, 4), (5, 6)], [2, 7]


async def _drive_schedule(make_backend) -> list[tuple[Source, int | None, float, float]]:
    """Same driver on any loop, per query: (source, instance, latency_ms from the scheduled time,
    the Prediction's own latency_ms)."""
    loop = asyncio.get_running_loop()
    backend = make_backend()
    config = ServingConfig(SIM_QUERY_SHAPE, mode="coded", k=2, group_wait_ms=20.0, stall_timeout_ms=5000.0)
    frontend = Frontend(config, backend, clock=loop.time)
    await frontend.start()
    backend.set_time_origin(time.time())
    futures, scheduled, answered = [], [], {}
    start = loop.time()
    try:
        for at_s, count in SCHEDULE:
            delay = start + at_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            for _ in range(count):
                i = len(futures)
                futures.append(frontend.submit(torch.full(SIM_QUERY_SHAPE, float(i + 1))))
                futures[i].add_done_callback(lambda _, i=i: answered.__setitem__(i, loop.time()))
                scheduled.append(start + at_s)
        preds: list[Prediction] = await asyncio.wait_for(asyncio.gather(*futures), 10.0)
    finally:
        await frontend.stop()
    return [(p.source, p.instance, (answered[i] - scheduled[i]) * 1e3, p.latency_ms) for i, p in enumerate(preds)]


def _fake_backend() -> FakeBackend:
    backend = FakeBackend(specs_for(instance_roles("coded", 2, 2), SIM_QUERY_SHAPE, 2, 2), delay_s=SERVICE_S)
    backend.set_delay(STRAGGLER, SERVICE_S * 100)
    return backend


def _sim_backend() -> SimBackend:
    return SimBackend(instance_roles("coded", 2, 2), ServiceModel("constant", median_ms=SERVICE_S * 1e3),
                      faults=parse_fault_spec(f"straggler:instance={STRAGGLER},factor=100"))


def test_simulator_and_real_frontend_agree_on_a_scripted_scenario() -> None:
    simulated = run_virtual(_drive_schedule(_sim_backend))
    real = asyncio.run(_drive_schedule(_fake_backend))
    outcomes = [(s, i) for s, i, _, _ in simulated]
    assert outcomes == [(s, i) for s, i, _, _ in real]  # same sources, same answering instances
    for a, b in PAIRS:
        assert sorted([outcomes[a], outcomes[b]]) == [(Source.ORIGINAL, 0), (Source.RECONSTRUCTED, None)]
    for single in SINGLES:
        assert outcomes[single] == (Source.ORIGINAL, 0)
    # virtual time is exact: every answer, original or decoded, comes one service time after its send
    assert [ms for _, _, ms, _ in simulated] == pytest.approx([SERVICE_S * 1e3] * len(simulated), abs=1e-6)
    assert [ms for _, _, _, ms in simulated] == pytest.approx([SERVICE_S * 1e3] * len(simulated), abs=1e-6)
    for n, ((_, _, sim_ms, _), (_, _, real_ms, _)) in enumerate(zip(simulated, real)):
        # wall-clock timers never fire early; a loaded machine may run them late, but far less than
        # the straggler's 300 ms would need to change any outcome
        assert sim_ms - 0.5 <= real_ms <= sim_ms + 150.0, f"query {n}: simulated {sim_ms:.2f} ms, real {real_ms:.2f} ms"
