"""The cluster simulator: the virtual-time loop, ``simulate()`` on the real Frontend over
SimBackend, and agreement between the simulator and the same Frontend over the FakeBackend on a
real event loop.

Everything here but the last test runs in virtual time (no real waiting); each test takes well
under 5 s of wall time.
"""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from parm.bench.loadgen import HistogramSink
from parm.bench.simulate import SIM_QUERY_SHAPE, ServiceModel, SimBackend, simulate
from parm.bench.stats import summarize
from parm.errors import ConfigError
from parm.faults import parse_fault_spec
from parm.serving import Frontend, ServingConfig, instance_roles
from parm.testing import SimulationStuck, VirtualTimeLoop, run_virtual

CONSTANT_10MS = ServiceModel("constant", median_ms=10.0)


def sim(mode: str, *, m: int = 4, k: int = 2, service: ServiceModel = CONSTANT_10MS, queries: int = 2000,
        rate_qps: float = 100.0, faults: str | None = None, seed: int = 0, **config):
    cfg = ServingConfig(SIM_QUERY_SHAPE, mode=mode, k=k, **config)
    return simulate(cfg, instance_roles(mode, m, k), service, queries=queries, rate_qps=rate_qps,
                    faults=parse_fault_spec(faults) if faults else None, seed=seed)


# ---- the virtual-time loop ------------------------------------------------------------------------
def test_an_hour_of_sleep_takes_no_wall_time() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        before = loop.time()
        await asyncio.sleep(3600)
        return before, loop.time()

    started = time.monotonic()
    before, after = run_virtual(main())
    assert time.monotonic() - started < 1.0
    assert after - before == pytest.approx(3600.0, abs=1e-6)


def test_timers_fire_in_time_order_at_their_times() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        fired: list[tuple[str, float]] = []
        done = loop.create_future()
        t0 = loop.time()
        for name, delay in (("c", 3.0), ("a", 1.0), ("d", 86_400.0 * 2), ("b", 2.0)):
            loop.call_later(delay, lambda n=name: fired.append((n, loop.time() - t0)))
        loop.call_at(t0 + 1.5, lambda: fired.append(("at", loop.time() - t0)))
        loop.call_later(86_400.0 * 2 + 1, done.set_result, None)  # past the 24 h select cap
        await done
        return fired

    fired = run_virtual(main())
    assert [n for n, _ in fired] == ["a", "at", "b", "c", "d"]
    assert [t for _, t in fired] == pytest.approx([1.0, 1.5, 2.0, 3.0, 172_800.0], abs=1e-6)


def test_sleeping_tasks_interleave_in_virtual_time() -> None:
    async def worker(name: str, period_s: float, log: list) -> None:
        for _ in range(3):
            await asyncio.sleep(period_s)
            log.append((name, round(asyncio.get_running_loop().time(), 9)))

    async def main() -> list:
        log: list = []
        await asyncio.gather(worker("slow", 1.0, log), worker("fast", 0.4, log))
        return log

    assert run_virtual(main()) == [("fast", 0.4), ("fast", 0.8), ("slow", 1.0), ("fast", 1.2), ("slow", 2.0),
                                   ("slow", 3.0)]


def test_waiting_for_a_future_nobody_resolves_is_stuck() -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_future()

    started = time.monotonic()
    with pytest.raises(SimulationStuck, match="waits forever"):
        run_virtual(main())
    assert time.monotonic() - started < 1.0


def test_a_timeout_on_a_future_nobody_resolves_fires_in_virtual_time() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(loop.create_future(), timeout=600)
        return loop.time() - t0

    assert run_virtual(main()) == pytest.approx(600.0, abs=1e-6)


def test_run_virtual_returns_the_result_and_closes_its_loop() -> None:
    async def main() -> tuple[str, asyncio.AbstractEventLoop]:
        await asyncio.sleep(5)
        return "done", asyncio.get_running_loop()

    result, loop = run_virtual(main())
    assert result == "done" and isinstance(loop, VirtualTimeLoop) and loop.is_closed()


# ---- simulate(): no faults ------------------------------------------------------------------------
def test_no_faults_every_query_original_at_the_service_time() -> None:
    result = sim("none", rate_qps=20.0)  # 4 instances at 5% utilisation
    s = summarize([result])
    assert result.sources == {"original": 2000}
    assert (result.lost, result.errors, result.restarts) == (0, 0, 0)
    assert s["p50_ms"] == pytest.approx(10.0, rel=0.002)  # batch_size 1: no batching wait
    assert s["max_ms"] >= 10.0 and result.histogram.percentile(0) == pytest.approx(10.0, rel=0.002)
    assert result.elapsed_s == pytest.approx(2000 / 20.0, rel=0.1)


def test_no_faults_batching_adds_at_most_the_batch_wait() -> None:
    result = sim("none", rate_qps=20.0, batch_size=4, batch_wait_ms=5.0)
    s = summarize([result])
    assert result.sources == {"original": 2000} and result.lost == 0
    # at 20 qps a batch almost never fills: most queries wait the full 5 ms, then 10 ms of service
    assert 10.0 <= result.histogram.percentile(0) and s["p50_ms"] == pytest.approx(15.0, rel=0.002)


def test_no_faults_coded_answers_everything_without_losses() -> None:
    result = sim("coded", rate_qps=20.0)
    assert result.lost == 0 and result.errors == 0
    assert sum(result.sources.values()) == 2000
    assert summarize([result])["p50_ms"] == pytest.approx(10.0, rel=0.002)


# ---- simulate(): faults ---------------------------------------------------------------------------
def test_straggler_coded_reconstructs_and_cuts_the_tail() -> None:
    faults = "straggler:instance=0,factor=50"  # instance 0 (data in both modes) takes 500 ms per batch
    coded, equal = sim("coded", faults=faults), sim("equal", faults=faults)
    assert coded.lost == equal.lost == 0 and coded.errors == equal.errors == 0
    assert coded.sources.get("reconstructed", 0) > 50
    assert "reconstructed" not in equal.sources
    p999 = lambda r: summarize([r])["p999_ms"]  # noqa: E731
    assert p999(equal) > 400.0  # queries stuck behind the straggler
    assert p999(coded) < p999(equal) / 5, (p999(coded), p999(equal))


@pytest.mark.parametrize("mode", ["none", "coded", "equal"])
def test_crash_loses_no_query_and_counts_the_restart(mode: str) -> None:
    result = sim(mode, faults="crash:instance=1,at_s=2", queries=1000)
    assert result.restarts == 1
    assert result.lost == 0 and result.errors == 0
    assert sum(result.sources.values()) == 1000


@pytest.mark.parametrize("mode", ["coded", "hedge"])
def test_deterministic_for_a_seed(mode: str) -> None:
    service = ServiceModel("lognormal", median_ms=8.0, sigma=0.3)
    runs = [sim(mode, service=service, rate_qps=300.0, seed=seed, queries=1500,
                faults="slow:rate_hz=0.5,duration_s=0.5,factor=10;seed=3") for seed in (7, 7, 8)]
    a, b, c = runs
    np.testing.assert_array_equal(a.histogram.counts, b.histogram.counts)
    assert summarize([a]) == summarize([b])
    assert not np.array_equal(a.histogram.counts, c.histogram.counts)


def test_simulate_needs_the_sim_query_shape() -> None:
    with pytest.raises(ConfigError) as info:
        simulate(ServingConfig((1, 28, 28), mode="none"), ["data"], CONSTANT_10MS, queries=10, rate_qps=10)
    assert info.value.field == "query_shape"


@pytest.mark.parametrize("kwargs", [{"kind": "weibull"}, {"kind": "empirical"}, {"median_ms": 0.0},
                                    {"sigma": -1.0}])
def test_service_model_validates(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        ServiceModel(**kwargs)


def test_empirical_service_resamples_its_samples() -> None:
    draw = ServiceModel("empirical", samples_ms=(2.0, 4.0), per_query_ms=1.0).sampler(np.random.default_rng(0))
    assert {draw(3) for _ in range(50)} == {0.005, 0.007}  # (sample + 3 × 1 ms) in seconds


# ---- timers on the virtual clock, and bugs ------------------------------------------------------
# The frontend runs on the virtual clock too (its stall timer, hedge percentile and
# Prediction.latency_ms); on the wall clock a simulated stall is never killed, hedging always
# fires after hedge_min_ms and hedge runs are not reproducible.
def test_simulated_stall_is_killed_after_stall_timeout() -> None:
    """Instance 0 goes silent at 1 s; the frontend kills it after 0.5 s (virtual) and re-sends
    its batches, so nothing fails. On wall time the kill never comes and its queries hit the deadline."""
    result = sim("none", m=2, service=ServiceModel("constant", median_ms=5.0), queries=1000, rate_qps=100.0,
                 faults="stall:instance=0,at_s=1", stall_timeout_ms=500.0, deadline_ms=10_000.0)
    assert result.restarts >= 1
    assert result.errors == 0 and result.lost == 0


def test_simulated_hedge_waits_for_the_service_percentile() -> None:
    """Hedge re-sends a batch only once it is later than the p95 of service times: at light load
    with a mildly variable service, only a few queries can be answered by the re-sent copy."""
    result = sim("hedge", service=ServiceModel("lognormal", median_ms=10.0, sigma=0.3), rate_qps=50.0,
                 queries=3000, seed=1)
    retried = result.sources.get("retried", 0) / result.queries
    assert retried < 0.08, f"{retried:.1%} of queries answered by a hedge copy"


def test_work_goes_to_idle_instances_first() -> None:
    """4 instances at 25% utilisation, constant 10 ms: with work sent to an idle instance whenever
    there is one (an M/D/4 queue waits with probability ~1.5% here), p90 is the service time."""
    result = sim("none", rate_qps=100.0)
    assert summarize([result])["p90_ms"] == pytest.approx(10.0, rel=0.01), summarize([result])


def test_simulated_rejections_keep_the_arrival_schedule() -> None:
    """One instance, at most one query pending, 5 ms service at 100 qps: an M/D/1/1 loss system
    refuses ρ/(1+ρ) = 1/3 of the queries (Erlang B)."""
    result = sim("none", m=1, service=ServiceModel("constant", median_ms=5.0), queries=2000, rate_qps=100.0,
                 max_pending_queries=1)
    assert result.lost == 0
    assert result.errors == 0
    assert 0.25 < result.rejected / result.queries < 0.42, f"{result.rejected} of {result.queries} refused"
    assert result.sources == {"original": result.ok, "error": result.rejected}  # counted as real runs count them


def test_sim_backend_crash_counts_from_the_time_origin() -> None:
    backend = SimBackend(["data", "data"], CONSTANT_10MS, faults=parse_fault_spec("crash:instance=1,at_s=1"))
    failures: list[tuple[int, float]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await backend.start(lambda *a: None, lambda i, reason: failures.append((i, loop.time())), lambda i: None)
        await asyncio.sleep(0.5)
        backend.set_time_origin(time.time())  # re-bases the schedule: the crash moves to 1.5 s
        await asyncio.sleep(10.0)
        backend.set_time_origin(time.time())  # an instance's injected crash fires once per run
        await asyncio.sleep(10.0)
        await backend.stop()

    run_virtual(main())
    assert [(i, round(t, 6)) for i, t in failures] == [(1, 1.5)]


# ---- dispatch fairness, lost queries --------------------------------------------------------------
@pytest.mark.parametrize("mode", ["equal", "none"])
def test_a_straggler_hurts_the_same_whichever_data_instance_it_is_on(mode: str) -> None:
    """Instances of one role are alike to the dispatcher: a 4x straggler on the first data
    instance and on the last one give the same tail (at low load, where the old first-free
    order sent nearly every batch to instance 0)."""
    roles = instance_roles(mode, 2, 2)
    lognormal = ServiceModel("lognormal", median_ms=10.0, sigma=0.1)
    tails = {}
    for victim in (0, len(roles) - 1):
        summary = summarize([sim(mode, m=2, service=lognormal, queries=6000, rate_qps=10.0,
                                 faults=f"straggler:instance={victim},factor=4")])
        tails[victim] = (summary["p50_ms"], summary["p99_ms"])
    (p50_first, p99_first), (p50_last, p99_last) = tails[0], tails[len(roles) - 1]
    assert p99_first == pytest.approx(p99_last, rel=0.15), tails
    assert p50_first == pytest.approx(p50_last, rel=0.15), tails


class _ForgetfulFrontend(Frontend):
    """A frontend with a bug: batch 5 is never answered and never failed (its future hangs)."""

    def settle(self, batch, source, outputs=None, instance=None, *, error=None) -> bool:
        return batch.batch_id != 5 and super().settle(batch, source, outputs, instance, error=error)


def test_a_query_nobody_answers_is_lost_and_the_simulation_still_ends() -> None:
    """Without a cutoff the stall watcher keeps the virtual loop alive forever waiting for it."""
    cfg = ServingConfig(SIM_QUERY_SHAPE, mode="none", deadline_ms=1000.0)
    started = time.monotonic()
    result = simulate(cfg, instance_roles("none", 2, 2), CONSTANT_10MS, queries=200, rate_qps=50.0,
                      frontend_factory=_ForgetfulFrontend)
    assert time.monotonic() - started < 30
    assert result.lost == 1 and result.errors == 0 and result.ok == 199
    assert result.elapsed_s < 200 / 50.0 * 2 + 1.0 + 5.0 + 1.0  # last arrival + deadline + grace, roughly
    assert math.isinf(summarize([result])["p999_ms"])  # 1 of 200 failed: the lost query reaches p99.9


def test_a_swallowed_batch_fails_at_its_deadline_and_counts_in_the_tail() -> None:
    """An instance that never answers one batch (and is never taken for stalled): the frontend
    fails the query at deadline_ms; it counts as an error and as +inf in the percentiles."""

    class Swallowing(SimBackend):
        def send(self, instance_id, work_id, inputs, *, spare=False):
            if work_id == 10:
                return  # swallowed forever
            super().send(instance_id, work_id, inputs)

    async def main():
        loop = asyncio.get_running_loop()
        from parm.bench.simulate import _run

        backend = Swallowing(instance_roles("none", 2, 2), CONSTANT_10MS, horizon_s=3600.0)
        cfg = ServingConfig(SIM_QUERY_SHAPE, mode="none", deadline_ms=500.0, stall_timeout_ms=1e9)
        return await _run(cfg, backend, HistogramSink(), queries=100, rate_qps=50.0, seed=0), loop

    result, _ = run_virtual(main())
    assert (result.errors, result.lost, result.ok) == (1, 0, 99)
    summary = summarize([result])
    assert math.isfinite(summary["p99_ms"]) and math.isinf(summary["p999_ms"])
