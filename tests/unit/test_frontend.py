"""The serving frontend over a fake backend with knobs (tests/fakes.py).

Instances run ``parm.models.toy.linear`` (data), its exact addition-code parity model
``linear_parity`` (parity) and a differently seeded linear model (cheap), so every answer —
original, retried or reconstructed — is checked against the true F(x) to float tolerance.
Every test runs on a virtual-time event loop (``parm.testing``): the frontend's timers, the
fake instances' scripted service times and the tests' own waits advance a virtual clock, so
nothing sleeps on the wall clock and no timing race depends on how loaded the machine is.
Tests await the query futures (with a timeout) or the fake backend's event-driven ``until``.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import pytest
import torch

from fakes import FakeBackend, specs_for
from parm.errors import (
    BadQueryError,
    ConfigError,
    DeadlineExceededError,
    ModelFailedError,
    OverloadedError,
    ServingError,
)
from parm.models.toy import linear
from parm.serving.config import CODED_MODES, MODES, ServingConfig, instance_roles
from parm.serving.frontend import Frontend
from parm.serving.types import Prediction, Source
from parm.testing import run_virtual

S = (1, 4, 4)  # query shape
C = 5  # classes
TOL = {"atol": 1e-5, "rtol": 1e-5}
TRUE_F = linear(S, C).eval()  # the same seeded model the data instances run
CHEAP_F = linear(S, C, seed=7).eval()  # the cheap instances' model (see fakes.specs_for)
WAIT_S = 2.0  # longest any single await in these tests may take


# ---- helpers ----------------------------------------------------------------------------------

def first_data(frontend) -> int:
    """The data instance the next batch goes to (the one idle longest)."""
    return frontend.dispatcher.idle_order("data")[0]

def build(mode: str = "coded", *, m: int = 2, k: int = 2, r: int = 1, delay_s: float = 0.001, restart_s: float = 0.005,
          **config) -> tuple[Frontend, FakeBackend]:
    serving_config = ServingConfig(query_shape=S, mode=mode, k=k, r=r, **config)
    backend = FakeBackend(specs_for(instance_roles(mode, m, k, r), S, C, k,
                                    spare_on_parity=serving_config.holds_spare("parity")),
                          delay_s=delay_s, restart_s=restart_s)
    frontend = Frontend(serving_config, backend, clock=loop_time)
    return frontend, backend


def loop_time() -> float:
    """The running loop's clock (virtual under ``run``)."""
    return asyncio.get_running_loop().time()


def run(coro, timeout_s: float = 10.0):
    """Run ``coro`` on a virtual-time loop, failing it after ``timeout_s`` of virtual time."""
    return run_virtual(asyncio.wait_for(coro, timeout_s))


def count(frontend: Frontend, source: Source | None = None) -> float:
    """Queries settled with ``source`` (all of them when None), from the frontend's metrics."""
    sources = list(Source) if source is None else [source]
    return sum(sample(frontend, "parm_queries_total", source=s.value) for s in sources)


@asynccontextmanager
async def serving(frontend: Frontend):
    await frontend.start()
    try:
        yield frontend
    finally:
        await frontend.stop()


def queries(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *S, generator=torch.Generator().manual_seed(seed))  # (n, *S)


def truth(q: torch.Tensor, model: torch.nn.Module = TRUE_F) -> torch.Tensor:
    with torch.no_grad():
        return model(q[None])[0]  # (*S) -> (C,)


async def answers(futures, timeout_s: float = WAIT_S) -> list:
    """Results (or exceptions) of ``futures``, in order."""
    return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout_s)


def assert_true_scores(preds: list[Prediction], qs: torch.Tensor) -> None:
    for i, (pred, q) in enumerate(zip(preds, qs)):
        assert isinstance(pred, Prediction), f"query {i} failed: {pred!r}"
        torch.testing.assert_close(pred.scores, truth(q), **TOL, msg=lambda m, i=i, pred=pred: f"query {i} ({pred.source}): {m}")
        assert pred.label == int(truth(q).argmax())


def sample(frontend: Frontend, name: str, **labels: str) -> float:
    value = frontend.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def ids(backend: FakeBackend, role: str) -> list[int]:
    return [s.instance_id for s in backend.instances if s.role == role]


async def warm_up(frontend: Frontend, n: int = 20) -> None:
    """Sequential fast queries, so the hedge/cheap deadline comes from measured service times."""
    for q in queries(n, seed=99):
        await asyncio.wait_for(frontend.submit(q), WAIT_S)


# ---- every mode answers -----------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_answers_every_query_with_the_true_output(mode: str, k: int) -> None:
    frontend, backend = build(mode, k=k)
    qs = queries(12, seed=k)

    async def main():
        async with serving(frontend):
            return await asyncio.wait_for(frontend.predict(qs), WAIT_S)

    preds = run(main())
    assert len(preds) == len(qs)
    assert_true_scores(preds, qs)
    allowed = {Source.ORIGINAL, Source.RECONSTRUCTED} if mode in CODED_MODES else {Source.ORIGINAL}
    assert {p.source for p in preds} <= allowed
    assert count(frontend) == len(qs)
    assert sample(frontend, "parm_query_latency_seconds_count") == len(qs)
    for p in preds:
        if p.source is Source.ORIGINAL:  # from a data instance, or one holding the deployed model as its spare
            spec = backend.instances[p.instance]
            assert spec.role == "data" or (mode == "coded-hedge" and spec.spare is not None)


def test_replicate_sends_each_batch_twice_to_two_instances_and_answers_once() -> None:
    frontend, backend = build("replicate", m=2)  # 4 data instances × 2 slots: every copy is sent
    qs = queries(3)

    async def main():
        async with serving(frontend):
            preds = await answers([frontend.submit(q) for q in qs])
            work = [s.work_id for q in qs for s in backend.sends_of(q)]
            await backend.until(lambda: all(w in backend.answered for w in work))  # the losing copies too
            return preds

    preds = run(main())
    assert_true_scores(preds, qs)
    for q in qs:
        sent = backend.sends_of(q)
        assert len(sent) == 2 and sent[0].instance != sent[1].instance
    assert [p.source for p in preds] == [Source.ORIGINAL] * 3
    assert count(frontend, Source.ORIGINAL) == 3 and count(frontend) == 3


def test_hedge_resends_a_late_batch_to_another_instance_and_answers_retried() -> None:
    frontend, backend = build("hedge", m=2, hedge_min_ms=5.0)  # 3 data instances
    q = queries(1, seed=5)[0]

    async def main():
        async with serving(frontend):
            await warm_up(frontend)
            warm_sends = len(backend.sends)
            slow = first_data(frontend)
            backend.set_delay(slow, 0.15)  # the next batch goes to it (idle longest) and is late
            pred = await asyncio.wait_for(frontend.submit(q), WAIT_S)
            late = backend.sends_of(q)[0]
            await backend.until(lambda: late.work_id in backend.answered)  # the late original comes back
            return pred, warm_sends, slow

    pred, warm_sends, slow = run(main())
    assert warm_sends == 20, "a batch that was not late was hedged"
    sent = backend.sends_of(q)
    assert [s.instance for s in sent][0] == slow and len(sent) == 2 and sent[1].instance != slow
    assert pred.source is Source.RETRIED and pred.instance == sent[1].instance
    assert_true_scores([pred], q[None])
    assert count(frontend, Source.RETRIED) == 1 and count(frontend) == 21  # the late original is ignored
    assert sample(frontend, "parm_resends_total") == 1


def test_hedge_times_a_batch_from_its_send_and_never_hedges_a_queued_one() -> None:
    frontend, backend = build("hedge", m=1, k=2, hedge_min_ms=5.0, max_in_flight=1)  # 2 data instances
    blockers, q = queries(2, seed=6), queries(1, seed=7)[0]

    async def main():
        async with serving(frontend):
            await warm_up(frontend)  # hedge deadline: max(5 ms, p95 of ~1 ms)
            resends = sample(frontend, "parm_resends_total")
            for i in ids(backend, "data"):
                backend.script(i, backend.received(i), 0.06)  # both instances busy for 60 ms
            futures = [frontend.submit(b) for b in blockers]
            late = frontend.submit(q)  # waits in the queue ~60 ms, far past the 5 ms deadline
            return await answers(futures + [late]), resends

    preds, resends_before = run(main())
    assert_true_scores(preds, torch.cat([blockers, q[None]]))
    assert len(backend.sends_of(q)) == 1, "a batch still queued was hedged"
    assert preds[-1].source is Source.ORIGINAL
    assert sample(frontend, "parm_resends_total") - resends_before == len(
        [s for b in blockers for s in backend.sends_of(b)]) - 2  # only re-sends that really left


@pytest.mark.parametrize("cheap_delay_s", [0.001, 0.015], ids=["cheap-in-before-late", "cheap-in-after-late"])
def test_cheap_answers_approximate_when_the_original_is_late(cheap_delay_s: float) -> None:
    frontend, backend = build("cheap", m=2, hedge_min_ms=5.0)  # data 0, 1; cheap 2
    (cheap,) = ids(backend, "cheap")
    q = queries(1, seed=6)[0]

    async def main():
        async with serving(frontend):
            await warm_up(frontend)
            backend.set_delay(0, 0.04)
            backend.set_delay(cheap, cheap_delay_s)
            pred = await asyncio.wait_for(frontend.submit(q), WAIT_S)
            late = backend.sends_of(q)[0]
            await backend.until(lambda: late.work_id in backend.answered)
            return pred

    pred = run(main())
    assert pred.source is Source.APPROXIMATE and pred.instance is None
    torch.testing.assert_close(pred.scores, truth(q, CHEAP_F), **TOL)
    assert count(frontend, Source.APPROXIMATE) == 1 and count(frontend) == 21
    assert sample(frontend, "parm_queries_total", source="approximate") == 1


# ---- coded: stragglers, crashes, stalls -------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 4])
def test_coded_straggler_is_reconstructed_its_queued_copy_never_sent_its_late_original_ignored(k: int) -> None:
    # round robin with one slot per instance: the straggler's second batch waits in its queue
    frontend, backend = build("coded", m=k, k=k, dispatch="round_robin", max_in_flight=1)
    qs = queries(2 * k, seed=10 + k)

    async def main():
        async with serving(frontend):
            data = ids(backend, "data")
            probe_on = backend.sends[0].instance
            straggler = data[(data.index(probe_on) + 1) % len(data)]  # round robin: batch 0's instance
            backend.set_delay(straggler, 0.03)
            preds = await answers([frontend.submit(q) for q in qs])
            first = backend.sends_of(qs[0])
            assert [s.instance for s in first] == [straggler]
            await backend.until(lambda: first[0].work_id in backend.answered)
            return preds

    preds = run(main())
    assert_true_scores(preds, qs)
    expected = [Source.RECONSTRUCTED if i % k == 0 else Source.ORIGINAL for i in range(2 * k)]
    assert [p.source for p in preds] == expected
    assert [p.instance for p in preds if p.source is Source.RECONSTRUCTED] == [None, None]
    assert backend.sends_of(qs[k]) == [], "the straggler's queued batch was sent after it was reconstructed"
    assert frontend.policy.tracker.late_originals == 1
    assert count(frontend, Source.RECONSTRUCTED) == 2 and count(frontend) == 2 * k
    assert sample(frontend, "parm_cancelled_batches_total") == 1
    assert sample(frontend, "parm_reconstructions_total") == 2


@pytest.mark.parametrize("honour", [False, True])
def test_coded_reconstructed_original_in_flight_is_cancelled_at_the_backend(honour: bool) -> None:
    frontend, backend = build("coded", m=2, k=2, max_in_flight=1)
    backend.honour_cancel = honour  # a started batch answers anyway, as on Ray
    qs = queries(2, seed=5)

    async def main():
        async with serving(frontend):
            slow = backend.sends[0].instance  # the probe's instance is the first offered data work
            backend.set_delay(slow, 0.5)
            preds = await answers([frontend.submit(q) for q in qs])
            sent = [s for s in backend.sends_to("data") if s.instance == slow and s.nth > 0]
            await backend.until(lambda: sent[0].work_id in backend.answered, timeout_s=1.0)
            return preds, sent

    preds, sent = run(main())
    assert_true_scores(preds, qs)
    assert sorted(p.source.value for p in preds) == ["original", "reconstructed"]
    assert backend.cancels == [(sent[0].instance, sent[0].work_id)]
    assert count(frontend, Source.ERROR) == 0
    assert frontend.dispatcher.instances[sent[0].instance].in_flight == {}


def test_coded_crash_of_a_data_instance_reconstructs_its_batch_and_loses_nothing() -> None:
    frontend, backend = build("coded", m=2, k=2, max_in_flight=1)
    qs = queries(6, seed=20)

    async def main():
        async with serving(frontend):
            first = first_data(frontend)
            backend.crash_on(first, backend.received(first))  # dies holding the first batch
            preds = await answers([frontend.submit(q) for q in qs])
            await backend.until(lambda: frontend.health()["instances"][first]["healthy"])
            return preds, first

    preds, first = run(main())
    assert_true_scores(preds, qs)
    assert preds[0].source is Source.RECONSTRUCTED
    assert backend.crashes == [first] and len(backend.dropped) == 1
    assert backend.dropped[0] == backend.sends_of(qs[0])[0].work_id
    assert count(frontend, Source.ERROR) == 0 and count(frontend) == 6
    assert sample(frontend, "parm_instance_restarts_total", instance=str(first)) == 1
    assert sample(frontend, "parm_instance_healthy", instance=str(first), role="data") == 1


def test_coded_crash_under_load_answers_every_query_correctly() -> None:
    frontend, backend = build("coded", m=3, k=3)
    qs = queries(30, seed=21)

    async def main():
        async with serving(frontend):
            backend.crash_on(1, backend.received(1) + 2)
            backend.crash_on(0, backend.received(0) + 5)
            return await answers([frontend.submit(q) for q in qs])

    preds = run(main())
    assert_true_scores(preds, qs)
    assert sorted(backend.crashes) == [0, 1]
    assert count(frontend, Source.ERROR) == 0 and count(frontend) == 30


def test_coded_crash_of_data_and_parity_resends_the_batch() -> None:
    frontend, backend = build("coded", m=2, k=2, max_in_flight=1)
    (parity,) = ids(backend, "parity")
    qs = queries(2, seed=22)

    async def main():
        async with serving(frontend):
            first = first_data(frontend)
            backend.crash_on(first, backend.received(first))
            backend.crash_on(parity, backend.received(parity))
            return await answers([frontend.submit(q) for q in qs])

    preds = run(main())
    assert_true_scores(preds, qs)
    assert [p.source for p in preds] == [Source.RETRIED, Source.ORIGINAL]
    assert len(backend.sends_of(qs[0])) == 2
    assert sample(frontend, "parm_resends_total") == 1
    assert sample(frontend, "parm_reconstructions_total") == 0


def test_coded_parity_crash_plus_stalled_data_instance_resends_after_the_stall_kill() -> None:
    frontend, backend = build("coded", m=2, k=2, max_in_flight=1, stall_timeout_ms=30)
    (parity,) = ids(backend, "parity")
    qs = queries(2, seed=23)

    async def main():
        async with serving(frontend):
            first = first_data(frontend)
            backend.stall(first)
            backend.crash_on(parity, backend.received(parity))
            return await answers([frontend.submit(q) for q in qs]), first

    preds, first = run(main())
    assert_true_scores(preds, qs)
    assert [p.source for p in preds] == [Source.RETRIED, Source.ORIGINAL]
    assert [i for i, _ in backend.kills] == [first]
    assert "stall_timeout_ms=30" in backend.kills[0][1]


@pytest.mark.parametrize(("k", "batch_size"), [(2, 1), (3, 1), (4, 1), (2, 3)])
def test_coded_lone_batch_is_protected_by_a_partial_group_filled_with_zero_queries(k: int, batch_size: int) -> None:
    frontend, backend = build("coded", m=2, k=k, batch_size=batch_size, group_wait_ms=5, stall_timeout_ms=5_000)
    (parity,) = ids(backend, "parity")
    q = queries(1, seed=30 + k)[0]

    async def main():
        async with serving(frontend):
            for d in ids(backend, "data"):
                backend.stall(d, persist=True)  # no original will ever come
            return await asyncio.wait_for(frontend.submit(q), WAIT_S)

    pred = run(main())
    assert pred.source is Source.RECONSTRUCTED
    assert_true_scores([pred], q[None])  # decoded with the filler F(0) for the k - 1 zero queries
    (p_sent,) = [s for s in backend.sends_to("parity")]
    assert p_sent.instance == parity
    expected = torch.zeros(batch_size, *S)  # (B, *S): q + zero padding, plus k - 1 zero queries
    expected[0] = q
    assert torch.equal(p_sent.inputs, expected)


# ---- batching ---------------------------------------------------------------------------------
def test_batching_sends_full_batches_at_once_and_pads_a_partial_batch_after_batch_wait_ms() -> None:
    frontend, backend = build("none", m=1, batch_size=4, batch_wait_ms=5)
    qs = queries(6, seed=40)

    async def main():
        async with serving(frontend):
            futures = [frontend.submit(q) for q in qs]
            sent_at_once = list(backend.sends)  # before yielding to the loop
            return sent_at_once, await answers(futures)

    sent_at_once, preds = run(main())
    assert len(sent_at_once) == 1 and torch.equal(sent_at_once[0].inputs, qs[:4])
    assert len(backend.sends) == 2
    partial = backend.sends[1].inputs  # (4, *S)
    assert torch.equal(partial[:2], qs[4:]) and torch.equal(partial[2:], torch.zeros(2, *S))
    assert_true_scores(preds, qs)
    assert all(p.source is Source.ORIGINAL for p in preds)
    assert min(p.latency_ms for p in preds[4:]) >= 5 * 0.9  # the partial batch waited batch_wait_ms
    assert count(frontend) == 6 and count(frontend, Source.ORIGINAL) == 6


@pytest.mark.parametrize("mode, dispatch", [("none", "shared"), ("coded", "shared"), ("none", "round_robin")])
def test_idle_batching_starts_a_partial_batch_at_once_and_fills_batches_while_instances_are_busy(
        mode: str, dispatch: str) -> None:
    # batch policy "idle": with m = 1 and a 10 ms model, two queries sent together start at once as one
    # batch (not after the 50 ms batch_wait_ms); three more sent while it runs wait for the instance, not
    # for batch_wait_ms, and go together as soon as it frees up
    frontend, backend = build(mode, m=1, k=2, batch_size=4, batch_wait_ms=50, batch_policy="idle", delay_s=0.01,
                              dispatch=dispatch)
    qs = queries(5, seed=41)

    async def main():
        async with serving(frontend):
            loop = asyncio.get_running_loop()
            await asyncio.sleep(0.1)  # past start-up work (the coded policy's probes)
            n0 = len(backend.sends)
            first = [frontend.submit(q) for q in qs[:2]]  # one request's queries, one event-loop turn
            assert len(backend.sends) == n0  # formed at the end of the turn, so both share the batch
            await asyncio.sleep(0.001)
            data = [s for s in backend.sends[n0:] if s.role == "data"]
            assert len(data) == 1 and torch.equal(data[0].inputs[:2], qs[:2])
            assert torch.equal(data[0].inputs[2:], torch.zeros(2, *S))
            t0 = loop.time()
            later = [frontend.submit(q) for q in qs[2:]]
            await asyncio.sleep(0.001)
            assert len([s for s in backend.sends[n0:] if s.role == "data"]) == 1  # the instance is busy: they wait
            preds = await answers(first + later)
            return preds, loop.time() - t0, [s for s in backend.sends[n0:] if s.role == "data"]

    preds, waited, data = run(main())
    assert len(data) == 2 and torch.equal(data[1].inputs[:3], qs[2:])
    assert_true_scores(preds, qs)
    assert waited < 0.05  # the second batch started when the instance freed up (~10 ms), not at batch_wait_ms
    assert all(p.latency_ms < 25 for p in preds)


def test_idle_batching_waits_for_batch_wait_ms_when_every_instance_is_busy() -> None:
    frontend, backend = build("none", m=1, batch_size=4, batch_wait_ms=5, batch_policy="idle", delay_s=1.0)
    qs = queries(2, seed=42)

    async def main():
        async with serving(frontend):
            first = frontend.submit(qs[0])
            await asyncio.sleep(0.001)  # the lone query starts at once and holds the only instance for 1 s
            second = frontend.submit(qs[1])
            await asyncio.sleep(0.003)
            before = (len(frontend._batches), frontend.batcher.lanes())  # still waiting for its batch
            await asyncio.sleep(0.005)  # past batch_wait_ms: its partial batch formed and waits to be sent
            after = (len(frontend._batches), frontend.batcher.lanes(), len(backend.sends))
            return await answers([first, second]), before, after

    preds, before, after = run(main())
    assert before == (1, 1) and after == (2, 0, 1)
    assert_true_scores(preds, qs)
    assert len(backend.sends) == 2 and preds[1].latency_ms >= 990  # it waited for the instance, then ran


def test_batch_policy_is_checked() -> None:
    with pytest.raises(ConfigError, match="batch_policy must be one of"):
        ServingConfig(query_shape=S, batch_policy="eager")


# ---- one request among many: request_window ---------------------------------------------------
@pytest.mark.parametrize("mode", ["none", "coded"])
def test_a_huge_request_holds_at_most_its_window_and_a_small_one_is_answered_before_it_ends(mode: str) -> None:
    # m = 2, batch 2, window 4: a 64-query request has at most 4 queries submitted at any time, so a one-query
    # request sent just after it is answered within a few batch times, not after all 64 (32 batch times)
    frontend, backend = build(mode, m=2, batch_size=2, request_window=4, delay_s=0.01)
    big, small = queries(64, seed=43), queries(1, seed=44)
    most = 0

    async def main():
        nonlocal most
        async with serving(frontend):
            await asyncio.sleep(0.1)  # past start-up probes
            t0 = asyncio.get_running_loop().time()
            big_task = asyncio.ensure_future(frontend.predict(big))
            await asyncio.sleep(0)
            assert frontend.pending_queries() == 64  # admitted whole
            most = frontend._unanswered  # submitted: the first window
            small_pred = await frontend.predict(small)
            small_done = asyncio.get_running_loop().time() - t0
            while not big_task.done():
                most = max(most, frontend._unanswered)
                await asyncio.sleep(0.002)
            big_done = asyncio.get_running_loop().time() - t0
            return big_task.result(), small_pred, small_done, big_done, frontend.pending_queries()

    big_preds, small_pred, small_done, big_done, left = run(main())
    assert_true_scores(big_preds, big)  # every answer, in order
    assert_true_scores(small_pred, small)
    assert most <= 4 + 1 and left == 0
    assert small_done < 0.1 < big_done  # ~4 batch times against ~32


def test_a_windowed_request_that_fails_frees_its_places_and_others_go_on() -> None:
    frontend, backend = build("none", m=1, batch_size=1, request_window=2, max_pending_queries=20)
    qs = queries(10, seed=45)

    async def main():
        async with serving(frontend):
            await asyncio.sleep(0.05)
            backend.model_error(0, times=1)  # the request's first batch fails: the request fails
            with pytest.raises(ModelFailedError):
                await frontend.predict(qs)
            await asyncio.sleep(0.1)  # its other submitted query is answered, read by nobody
            left = frontend.pending_queries()
            again = await frontend.predict(qs)  # the places are free: admitted and answered
            return left, again

    left, again = run(main())
    assert left == 0
    assert_true_scores(again, qs)


def test_request_window_is_checked() -> None:
    with pytest.raises(ConfigError, match="request_window must be an integer >= 0"):
        ServingConfig(query_shape=S, request_window=-1)


# ---- stalls, deadlines ------------------------------------------------------------------------
def test_a_stalled_instance_is_killed_and_its_batch_resent_elsewhere() -> None:
    frontend, backend = build("none", m=2, stall_timeout_ms=30)
    q = queries(1, seed=50)[0]

    async def main():
        async with serving(frontend):
            backend.stall(0)
            pred = await asyncio.wait_for(frontend.submit(q), WAIT_S)
            await backend.until(lambda: frontend.health()["instances"][0]["healthy"])
            return pred

    pred = run(main())
    assert pred.source is Source.RETRIED and pred.instance == 1
    assert_true_scores([pred], q[None])
    assert [i for i, _ in backend.kills] == [0] and "stall_timeout_ms=30" in backend.kills[0][1]
    assert sample(frontend, "parm_instance_restarts_total", instance="0") == 1
    assert sample(frontend, "parm_resends_total") == 1


def test_a_stalled_instance_is_killed_even_when_a_backend_cancels_each_batch_it_holds() -> None:
    # The Ray backend answers a cancelled, not yet started request at once: each batch of the
    # stalled instance is reconstructed, cancelled and handed back, so it never *holds* work for
    # long; its silence must still count (and the parity instance, whose batches are often
    # cancelled too, must not be taken for stalled).
    frontend, backend = build("coded", m=2, k=2, max_in_flight=1, stall_timeout_ms=60)
    backend.honour_cancel = True
    qs = queries(80, seed=51)

    async def main():
        async with serving(frontend):
            stalled = first_data(frontend)
            backend.stall(stalled)
            (parity,) = ids(backend, "parity")
            backend.set_delay(parity, 0.01)  # reconstructions take a while: the stalled instance holds work
            preds = []
            for q in qs:  # one group every 5 ms: the stalled instance gets a batch in each
                preds.append(frontend.submit(q))
                await asyncio.sleep(0.0025)
            return await answers(preds), stalled

    preds, stalled = run(main())
    assert_true_scores(preds, qs)
    assert count(frontend, Source.RECONSTRUCTED) > 0 and backend.cancels
    assert [i for i, _ in backend.kills] == [stalled]


def test_an_instance_idle_after_a_cancelled_batch_is_not_taken_for_stalled() -> None:
    frontend, backend = build("coded", m=2, k=2, max_in_flight=1, stall_timeout_ms=100)
    backend.honour_cancel = True
    qs = queries(4, seed=52)

    async def main():
        async with serving(frontend):
            slow = first_data(frontend)
            backend.stall(slow)  # its first batch is reconstructed, then cancelled before it starts
            first = await answers([frontend.submit(q) for q in qs[:2]])
            await backend.until(lambda: backend.in_flight(slow) == 0)
            backend.unstall(slow)
            await asyncio.sleep(0.25)  # idle for longer than stall_timeout_ms
            for instance in ids(backend, "data") + ids(backend, "parity"):  # now it answers first, in 80 ms
                backend.set_delay(instance, 0.08 if instance == slow else 0.09)
            return first + await answers([frontend.submit(q) for q in qs[2:]])

    preds = run(main())
    assert_true_scores(preds, qs)
    assert backend.cancels and backend.kills == []


@pytest.mark.parametrize("mode", ["none", "coded"])
def test_a_query_with_no_possible_answer_fails_with_deadline_exceeded(mode: str) -> None:
    frontend, backend = build(mode, m=1, deadline_ms=40, stall_timeout_ms=10_000)
    q = queries(1, seed=51)[0]

    async def main():
        async with serving(frontend):
            for spec in backend.instances:
                backend.stall(spec.instance_id, persist=True)
            return await answers([frontend.submit(q)])

    (err,) = run(main())
    assert isinstance(err, DeadlineExceededError) and err.deadline_s == pytest.approx(0.04)
    assert count(frontend, Source.ERROR) == count(frontend) == 1
    assert sample(frontend, "parm_queries_total", source="error") == 1
    assert frontend.pending_queries() == 0


def test_deadline_holds_while_a_stalled_instance_is_killed_again_and_again() -> None:
    frontend, backend = build("none", m=2, deadline_ms=200, stall_timeout_ms=20)
    q = queries(1, seed=52)[0]

    async def main():
        async with serving(frontend):
            backend.stall(0, persist=True)
            backend.stall(1, persist=True)
            return await answers([frontend.submit(q)])

    (err,) = run(main())
    assert isinstance(err, DeadlineExceededError)
    assert len(backend.kills) >= 2


# ---- refusals and errors ----------------------------------------------------------------------
def test_overload_refuses_with_429_and_counts_the_refusal() -> None:
    frontend, backend = build("none", m=1, max_pending_queries=3)
    qs = queries(4, seed=60)

    async def main():
        async with serving(frontend):
            backend.stall(0, persist=True)
            accepted = [frontend.submit(q) for q in qs[:3]]
            assert frontend.pending_queries() == 3
            with pytest.raises(OverloadedError) as caught:
                frontend.submit(qs[3])
            assert frontend.health()["pending_queries"] == 3
        return caught.value, await answers(accepted)

    err, refused_later = run(main())
    assert err.status == 429 and err.limit == "max_pending_queries" and "3" in str(err)
    assert sample(frontend, "parm_rejected_queries_total", reason="overloaded") == 1
    assert all(isinstance(e, ServingError) for e in refused_later)  # failed by stop(), not hung


def test_a_full_frontend_says_so_and_a_request_that_could_never_fit_is_413() -> None:
    frontend, backend = build("none", m=1, max_pending_queries=3)

    async def main():
        async with serving(frontend):
            backend.stall(0, persist=True)
            assert not frontend.overloaded()
            with pytest.raises(BadQueryError, match="holds 4 queries but the server keeps at most") as caught:
                await frontend.predict(queries(4, seed=61))
            assert caught.value.status == 413 and frontend.pending_queries() == 0
            accepted = [frontend.submit(q) for q in queries(3, seed=62)]
            assert frontend.overloaded()  # the HTTP edge sheds before reading the next body
        return await answers(accepted)

    run(main())


def test_bad_query_shape_is_refused() -> None:
    frontend, backend = build("none", m=1)

    async def main():
        async with serving(frontend):
            with pytest.raises(BadQueryError) as caught:
                frontend.submit(torch.zeros(1, 4, 5))
            with pytest.raises(ValueError):
                frontend.submit(torch.zeros(*S)[None])
            return caught.value

    err = run(main())
    assert err.field == "inputs" and err.status == 422 and "[1, 4, 5]" in str(err)
    assert backend.sends == [] and frontend.pending_queries() == 0


@pytest.mark.parametrize("mode", ["none", "coded"])
def test_a_model_error_fails_only_its_batch_and_serving_goes_on(mode: str) -> None:
    frontend, backend = build(mode, m=1, batch_size=2, max_in_flight=1)
    qs = queries(6, seed=70)

    async def main():
        async with serving(frontend):
            backend.model_error(0, times=1)  # the first data batch (queries 0, 1) fails
            first = await answers([frontend.submit(q) for q in qs[:4]])
            later = await answers([frontend.submit(q) for q in qs[4:]])
            return first + later

    results = run(main())
    if mode == "coded":  # the group decodes the batch the model failed on
        assert [r.source for r in results[:2]] == [Source.RECONSTRUCTED] * 2
        assert_true_scores(results, qs)
        assert count(frontend, Source.ERROR) == 0 and count(frontend) == 6
        return
    for err in results[:2]:
        assert type(err) is ModelFailedError and err.status == 500 and "model failed" in str(err)
    assert_true_scores(results[2:], qs[2:])
    assert count(frontend, Source.ERROR) == 2 and count(frontend) == 6


def test_coded_parity_model_error_falls_back_to_resending_a_failed_batch() -> None:
    """When the parity instance *crashes*, the failed batch is re-sent."""
    frontend, backend = build("coded", m=2, k=2, max_in_flight=1, deadline_ms=400)
    (parity,) = ids(backend, "parity")
    qs = queries(2, seed=71)

    async def main():
        async with serving(frontend):
            backend.crash_on(parity, backend.received(parity))
            backend.crash_on(0, backend.received(0))
            return await answers([frontend.submit(q) for q in qs])

    preds = run(main())
    assert_true_scores(preds, qs)


def test_coded_parity_model_error_then_data_crash_still_answers() -> None:
    frontend, backend = build("coded", m=2, k=2, max_in_flight=1, deadline_ms=400)
    (parity,) = ids(backend, "parity")
    qs = queries(2, seed=72)

    async def main():
        async with serving(frontend):
            backend.model_error(parity, times=1)
            first = first_data(frontend)
            backend.crash_on(first, backend.received(first))
            return await answers([frontend.submit(q) for q in qs])

    preds = run(main())
    assert_true_scores(preds, qs)  # got DeadlineExceededError for query 0
    assert preds[0].source is Source.RETRIED


def test_coded_data_model_error_then_crash_of_the_other_member_still_answers_it() -> None:
    frontend, backend = build("coded", m=2, k=2, max_in_flight=1, deadline_ms=400)
    qs = queries(2, seed=77)

    async def main():
        async with serving(frontend):
            backend.model_error(0, times=1)  # batch 0 (on instance 0) fails: expected
            backend.crash_on(1, backend.received(1))  # batch 1's instance dies
            return await answers([frontend.submit(q) for q in qs])

    errored, pred = run(main())
    # both are unavailable now (model error, crash): the group cannot decode, so both are re-sent
    assert isinstance(errored, Prediction) and isinstance(pred, Prediction), f"got {errored!r}, {pred!r}"
    assert errored.source is Source.RETRIED  # re-sent; with it back, the other decodes (or its copy wins)
    assert pred.source in (Source.RETRIED, Source.RECONSTRUCTED)
    assert_true_scores([errored, pred], qs)


def test_crash_of_the_only_data_instance_is_retried_after_it_restarts() -> None:
    frontend, backend = build("none", m=1, deadline_ms=400)
    q = queries(1, seed=73)[0]

    async def main():
        async with serving(frontend):
            backend.crash_on(0, backend.received(0))
            return await answers([frontend.submit(q)])

    (pred,) = run(main())
    assert isinstance(pred, Prediction), f"got {pred!r}"
    assert pred.source is Source.RETRIED


def test_coded_members_of_a_group_go_to_different_instances() -> None:
    frontend, backend = build("coded", m=2, k=2)  # default max_in_flight=2
    qs = queries(2, seed=74)

    async def main():
        async with serving(frontend):
            return await answers([frontend.submit(q) for q in qs])

    preds = run(main())
    assert_true_scores(preds, qs)
    (a,), (b,) = backend.sends_of(qs[0]), backend.sends_of(qs[1])
    assert a.instance != b.instance


def test_coded_one_slow_instance_is_covered_with_default_config() -> None:
    frontend, backend = build("coded", m=2, k=2)
    qs = queries(2, seed=75)

    async def main():
        async with serving(frontend):
            backend.set_delay(0, 0.2)  # instance 0 is the first one pump offers work to
            return await answers([frontend.submit(q) for q in qs])

    preds = run(main())
    assert_true_scores(preds, qs)
    # members on different instances: the slow one's batch is reconstructed within a few ms
    assert max(p.latency_ms for p in preds) < 100, [(p.source, p.instance, p.latency_ms) for p in preds]


def test_stop_fails_queries_still_waiting_for_their_batch() -> None:
    frontend, backend = build("none", m=1, batch_size=4, batch_wait_ms=5)
    q = queries(1, seed=76)[0]

    async def main():
        await frontend.start()
        future = frontend.submit(q)
        await frontend.stop()
        return await answers([future], timeout_s=0.5)

    try:
        (err,) = run(main())
    except asyncio.TimeoutError:
        pytest.fail("the query submitted before stop() was never answered")
    assert isinstance(err, ServingError)
    assert backend.sends_after_stop == 0


# ---- metrics and health -----------------------------------------------------------------------
def test_metrics_count_queries_by_source_and_reconstructed_batches() -> None:
    frontend, backend = build("coded", m=2, k=2, batch_size=2, max_in_flight=1, dispatch="round_robin")
    qs = queries(4, seed=80)  # two batches of two: one coding group

    async def main():
        async with serving(frontend):
            data = ids(backend, "data")
            straggler = data[(data.index(backend.sends[0].instance) + 1) % len(data)]
            backend.stall(straggler)
            preds = await answers([frontend.submit(q) for q in qs])
            return preds

    preds = run(main())
    assert_true_scores(preds, qs)
    assert [p.source for p in preds] == [Source.RECONSTRUCTED] * 2 + [Source.ORIGINAL] * 2
    assert sample(frontend, "parm_queries_total", source="reconstructed") == 2  # queries
    assert sample(frontend, "parm_reconstructions_total") == 1  # batches
    assert sample(frontend, "parm_queries_total", source="original") == 2
    assert count(frontend, Source.RECONSTRUCTED) == 2


def test_health_reports_instances_and_follows_a_crash() -> None:
    frontend, backend = build("coded", m=2, k=2, restart_s=0.01)

    async def main():
        async with serving(frontend):
            before = frontend.health()
            backend.crash(1)
            during = frontend.health()
            await backend.until(lambda: backend.healthy(1))
            return before, during, frontend.health()

    before, during, after = run(main())
    assert before["ok"] and before["status"] == "ok" and before["mode"] == "coded"
    assert [(i["id"], i["role"], i["healthy"]) for i in before["instances"]] == \
        [(0, "data", True), (1, "data", True), (2, "parity", True)]
    assert not during["ok"] and during["status"] == "degraded" and during["serving"]  # serving, not all up
    assert not during["instances"][1]["healthy"]
    assert after["instances"][1]["healthy"] and after["ok"]
    assert sample(frontend, "parm_instance_healthy", instance="1", role="data") == 1


def test_a_slow_but_working_instance_is_not_taken_for_stalled() -> None:
    """Two batches in flight on an instance that serves one at a time, 30 ms each: the second
    waits 60 ms from its send, more than stall_timeout_ms, but the instance answers every 30 ms,
    so it is never killed (a rule timing each batch from its send would kill it)."""
    frontend, backend = build("none", m=1, max_in_flight=2, stall_timeout_ms=50, delay_s=0.03)
    backend.serial = True
    qs = queries(8, seed=90)

    async def main():
        async with serving(frontend):
            return await answers([frontend.submit(q) for q in qs])

    preds = run(main())
    assert_true_scores(preds, qs)
    assert backend.kills == [] and all(p.source is Source.ORIGINAL for p in preds)
    assert max(p.latency_ms for p in preds) > 50  # the second batch in flight did wait past the timeout


def test_round_robin_serves_a_dead_instance_queue_elsewhere_while_its_restart_is_blocked() -> None:
    """m = 2, the paper's dispatch: instance 1 dies on its first batch and does not come back
    for a minute. Its batch and the work queued for it run on instance 0 instead."""
    frontend, backend = build("none", m=2, dispatch="round_robin", max_in_flight=1, restart_s=60.0,
                              deadline_ms=1500)
    qs = queries(6, seed=78)

    async def main():
        async with serving(frontend):
            backend.crash_on(1, backend.received(1))
            return await answers([frontend.submit(q) for q in qs])

    preds = run(main())
    assert_true_scores(preds, qs)  # on the old dispatcher: DeadlineExceededError for the queries queued for 1
    assert all(p.instance == 0 for p in preds)
    assert backend.crashes == [1] and not backend.healthy(1)


# ---- coded-hedge: ParM with a hedged fallback ---------------------------------------------------
@pytest.mark.parametrize("mode", ["coded", "coded-hedge"])
def test_coded_hedge_resends_a_batch_its_group_cannot_decode_and_coded_waits_for_the_stall_kill(mode: str) -> None:
    """A data instance stalls while the parity instance is stalled too: the group cannot decode.
    coded-hedge re-sends the late batch to the other data instance at the hedge deadline; coded
    can only wait until the stall watcher kills the instance (stall_timeout_ms). The copy that
    answers first has the original cancelled."""
    frontend, backend = build(mode, m=2, k=2, stall_timeout_ms=2_000)
    backend.honour_cancel = True
    (parity,) = ids(backend, "parity")
    qs = queries(2, seed=41)

    async def main():
        async with serving(frontend):
            await warm_up(frontend)
            first = first_data(frontend)
            backend.stall(first)
            backend.stall(parity)
            return await answers([frontend.submit(q) for q in qs], timeout_s=5.0), first

    preds, first = run(main())
    assert_true_scores(preds, qs)
    late = max(preds, key=lambda p: p.latency_ms)
    assert late.source is Source.RETRIED
    if mode == "coded-hedge":
        assert late.latency_ms < 50  # the hedge deadline (a few ms of service time), not the stall timeout
        assert backend.kills == [] and any(i == first for i, _ in backend.cancels)
    else:
        assert late.latency_ms >= 2_000


def test_coded_hedge_does_not_resend_a_batch_its_group_decodes_in_time() -> None:
    frontend, backend = build("coded-hedge", m=2, k=2, stall_timeout_ms=2_000)
    qs = queries(2, seed=42)

    async def main():
        async with serving(frontend):
            await warm_up(frontend)
            backend.set_delay(first_data(frontend), 0.5)  # slow, and the group decodes it first
            return await answers([frontend.submit(q) for q in qs])

    preds = run(main())
    assert_true_scores(preds, qs)
    assert sorted(p.source.value for p in preds) == ["original", "reconstructed"]
    assert sample(frontend, "parm_resends_total") == 0


# ---- accepting a reconstruction only once the original is late ----------------------------------
def _slow_member_scenario(percentile: float | None, *, first_delay_s: float, crash: bool = False):
    """Warm up at 10 ms per batch (so recent answer times are ~10 ms), then make the other data
    instance and the parity fast: the group can decode the first member after ~1 ms."""
    frontend, backend = build("coded", m=2, k=2, delay_s=0.010, stall_timeout_ms=5_000,
                              reconstruct_percentile=percentile)
    (parity,) = ids(backend, "parity")
    qs = queries(2, seed=44)

    async def main():
        async with serving(frontend):
            await warm_up(frontend, n=30)
            first = first_data(frontend)
            other = next(i for i in ids(backend, "data") if i != first)
            backend.set_delay(other, 0.001)
            backend.set_delay(parity, 0.001)
            backend.set_delay(first, first_delay_s)
            if crash:
                backend.crash_on(first, backend.received(first))
            return await answers([frontend.submit(q) for q in qs], timeout_s=5.0)

    preds = run(main())
    assert_true_scores(preds, qs)
    return preds[0], frontend


def test_eager_reconstruction_answers_a_busy_but_healthy_members_batch_from_the_parity() -> None:
    pred, _ = _slow_member_scenario(None, first_delay_s=0.008)
    assert pred.source is Source.RECONSTRUCTED and pred.latency_ms < 5


def test_a_reconstruction_is_held_while_the_original_is_not_late_and_the_original_answers() -> None:
    pred, frontend = _slow_member_scenario(95.0, first_delay_s=0.008)
    assert pred.source is Source.ORIGINAL
    assert sample(frontend, "parm_reconstructions_total") == 0


def test_a_held_reconstruction_is_used_once_the_original_is_late() -> None:
    pred, frontend = _slow_member_scenario(95.0, first_delay_s=1.0)
    assert pred.source is Source.RECONSTRUCTED
    assert 9 <= pred.latency_ms < 30  # at the ~10 ms percentile, not at 1 ms and not after 1 s


def test_a_reconstruction_is_taken_at_once_when_the_original_failed() -> None:
    pred, _ = _slow_member_scenario(95.0, first_delay_s=0.008, crash=True)
    assert pred.source is Source.RECONSTRUCTED and pred.latency_ms < 5


# ---- r = 2 parities per group --------------------------------------------------------------------
def test_r2_layout_has_one_instance_per_parity_model_at_cost_m_plus_ceil_mr_over_k() -> None:
    assert instance_roles("coded", 2, 2, 2) == ["data", "data", "parity", "parity1"]
    assert instance_roles("equal", 2, 2, 2) == ["data"] * 4
    assert instance_roles("coded", 3, 2, 2) == ["data"] * 3 + ["parity", "parity1", "parity"]
    with pytest.raises(ConfigError, match="at least 2 parity instances"):
        instance_roles("coded", 1, 4, 2)


@pytest.mark.parametrize("r", [1, 2])
def test_r2_decodes_two_stalled_members_of_one_group_where_r1_waits_for_the_stall_kill(r: int) -> None:
    frontend, backend = build("coded", m=2, k=2, r=r, stall_timeout_ms=1_000)
    qs = queries(2, seed=45)

    async def main():
        async with serving(frontend):
            for i in ids(backend, "data"):
                backend.stall(i)
            return await answers([frontend.submit(q) for q in qs], timeout_s=5.0)

    preds = run(main())
    assert_true_scores(preds, qs)  # r = 2: decoded exactly by the two parity models' linear system
    if r == 2:
        assert [p.source for p in preds] == [Source.RECONSTRUCTED] * 2
        assert max(p.latency_ms for p in preds) < 50
        assert backend.kills == []
    else:
        assert min(p.latency_ms for p in preds) >= 1_000


def test_r2_a_group_with_one_parity_lost_still_decodes_one_member() -> None:
    frontend, backend = build("coded", m=2, k=2, r=2, stall_timeout_ms=2_000)
    (p0,) = ids(backend, "parity")
    qs = queries(2, seed=46)

    async def main():
        async with serving(frontend):
            backend.stall(first_data(frontend))
            backend.crash_on(p0, backend.received(p0))
            return await answers([frontend.submit(q) for q in qs], timeout_s=5.0)

    preds = run(main())
    assert_true_scores(preds, qs)
    assert sorted(p.source.value for p in preds) == ["original", "reconstructed"]
    assert max(p.latency_ms for p in preds) < 50


@pytest.mark.parametrize("hedge_on_parity", [True, False])
def test_coded_hedge_runs_late_batches_on_the_parity_instance_when_every_data_instance_stalls(
        hedge_on_parity: bool) -> None:
    """Both data instances stall: the group cannot be decoded (r = 1) and there is no other data
    instance; the parity instance, which also holds the deployed model, answers the re-sends.
    Without it (hedge_on_parity off) they wait for the stall watcher."""
    frontend, backend = build("coded-hedge", m=2, k=2, stall_timeout_ms=1_000, hedge_on_parity=hedge_on_parity)
    (parity,) = ids(backend, "parity")
    qs = queries(4, seed=47)

    async def main():
        async with serving(frontend):
            await warm_up(frontend)
            for i in ids(backend, "data"):
                backend.stall(i)
            return await answers([frontend.submit(q) for q in qs], timeout_s=5.0)

    preds = run(main())
    assert_true_scores(preds, qs)
    if not hedge_on_parity:
        assert min(p.latency_ms for p in preds) >= 1_000 and not any(s.spare for s in backend.sends)
        return
    # the stalled instances' batches are re-sent there, queued ones run there as originals, and an
    # answer from it can in turn let its group decode the other member
    assert Source.RETRIED in {p.source for p in preds} <= {Source.RETRIED, Source.ORIGINAL, Source.RECONSTRUCTED}
    assert all(p.instance in (parity, None) for p in preds) and max(p.latency_ms for p in preds) < 100
    assert backend.kills == [] and any(s.spare for s in backend.sends_to("parity"))


def test_the_tiles_code_reconstructs_two_stalled_members_of_a_group_from_one_parity_output() -> None:
    """With the tiles code one parity output holds a prediction per member, so a group of k = 3
    decodes two late members at once (the addition code would need r = 2)."""
    from fakes import TOY, FakeBackend
    from parm.backends.base import InstanceSpec, ModelRef
    from parm.models.toy import pooled_linear

    k = 3
    kwargs = {"in_shape": S, "num_classes": C, "k": k}
    data = ModelRef(factory=f"{TOY}:pooled_linear", kwargs=kwargs)
    parity = ModelRef(factory=f"{TOY}:pooled_linear_tiles", kwargs=kwargs)
    roles = instance_roles("coded", k, k)
    backend = FakeBackend([InstanceSpec(i, role, data if role == "data" else parity) for i, role in enumerate(roles)],
                          delay_s=0.001)
    frontend = Frontend(ServingConfig(query_shape=S, mode="coded", k=k, encoder="tiles", dispatch="round_robin"),
                        backend, clock=loop_time)
    model = pooled_linear(S, C, k).eval()
    qs = queries(k, seed=40)

    async def main():
        async with serving(frontend):
            for instance in ids(backend, "data")[:2]:
                backend.set_delay(instance, 1.0)  # two of the three members are late
            return await answers([frontend.submit(q) for q in qs])

    preds = run(main())
    assert sorted(p.source.value for p in preds) == ["original", "reconstructed", "reconstructed"]
    for pred, q in zip(preds, qs):
        torch.testing.assert_close(pred.scores, truth(q, model), **TOL)
