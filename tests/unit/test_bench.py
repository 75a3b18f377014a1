"""Benchmark building blocks: the Poisson arrival schedule, percentiles (exact and histogram),
open-loop latency from the *scheduled* time, run summaries and experiment files.

Open-loop tests run on the virtual-time loop (``run_virtual``) against fakes whose answer
times are scripted, so every latency is known exactly and no real time passes. scipy is not
a dependency, so the Kolmogorov–Smirnov statistic is computed with numpy.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fakes import FakeBackend, specs_for
from parm.bench.experiment import load_experiment
from parm.bench.histogram import LatencyHistogram
from parm.bench.loadgen import (
    HistogramSink,
    QueryResult,
    RecordSink,
    Sink,
    drive_open_loop,
    poisson_arrivals_s,
    run_open_loop,
)
from parm.bench.stats import PERCENTILES, latency_summary, summarize
from parm.errors import ConfigError, OverloadedError, ServingError
from parm.faults.spec import Crash, SlowEpisodes
from parm.serving import Frontend, ServingConfig, instance_roles
from parm.serving.types import Prediction, Source
from parm.testing import run_virtual

# ---- the arrival schedule ------------------------------------------------------------------------
N_ARRIVALS = 20_000
RATE_QPS = 250.0


@pytest.fixture(scope="module")
def arrivals() -> np.ndarray:
    return poisson_arrivals_s(N_ARRIVALS, RATE_QPS, seed=11)  # (n,)


def test_arrivals_shape_start_and_order(arrivals: np.ndarray) -> None:
    assert arrivals.shape == (N_ARRIVALS,)
    assert arrivals[0] == 0.0  # the first query goes out at once
    assert np.all(np.diff(arrivals) >= 0)


def test_gaps_are_exponential_ks(arrivals: np.ndarray) -> None:
    """One-sample Kolmogorov–Smirnov test against Exp(rate): D below the 0.1% critical value."""
    gaps = np.sort(np.diff(arrivals))  # (n-1,)
    n = gaps.size
    cdf = 1.0 - np.exp(-RATE_QPS * gaps)  # (n,)
    d_plus = np.max(np.arange(1, n + 1) / n - cdf)
    d_minus = np.max(cdf - np.arange(0, n) / n)
    d = max(d_plus, d_minus)
    assert d < 1.95 / math.sqrt(n), f"KS D={d:.4f} over the 0.1% critical value {1.95 / math.sqrt(n):.4f}"


def test_gap_moments_and_quantiles(arrivals: np.ndarray) -> None:
    gaps = np.diff(arrivals)  # (n-1,)
    n, mean = gaps.size, 1.0 / RATE_QPS
    # 4-sigma bands: sd(mean) = mean/sqrt(n); sd(var)/var = sqrt(8/n) for an exponential
    assert abs(gaps.mean() - mean) < 4 * mean / math.sqrt(n)
    assert abs(gaps.var() / mean**2 - 1.0) < 4 * math.sqrt(8 / n)
    for q in (0.1, 0.5, 0.9, 0.99):
        expected = -math.log1p(-q) * mean
        sd = math.sqrt(q * (1 - q) / n) / (RATE_QPS * (1 - q))  # sd of a sample quantile: sqrt(q(1-q)/n)/f(x_q)
        assert abs(np.quantile(gaps, q) - expected) < 5 * sd, f"quantile {q}"
    lag1 = np.corrcoef(gaps[:-1], gaps[1:])[0, 1]  # independent gaps
    assert abs(lag1) < 4 / math.sqrt(n)


def test_window_counts_are_poisson(arrivals: np.ndarray) -> None:
    """Counts in fixed 0.1 s windows: mean = rate·w and dispersion (variance/mean) ≈ 1."""
    window_s = 0.1
    n_windows = int(arrivals[-1] // window_s)  # whole windows only
    counts = np.bincount((arrivals // window_s).astype(np.int64), minlength=n_windows + 1)[:n_windows]  # (W,)
    expected = RATE_QPS * window_s
    assert abs(counts.mean() - expected) < 4 * math.sqrt(expected / n_windows)
    dispersion = counts.var(ddof=1) / counts.mean()
    assert abs(dispersion - 1.0) < 4 * math.sqrt(2 / (n_windows - 1)), f"dispersion {dispersion:.3f}"


def test_arrivals_deterministic_per_seed() -> None:
    a = poisson_arrivals_s(1000, 50.0, seed=3)
    np.testing.assert_array_equal(a, poisson_arrivals_s(1000, 50.0, seed=3))
    assert not np.array_equal(a, poisson_arrivals_s(1000, 50.0, seed=4))
    # the rate only scales the schedule
    np.testing.assert_allclose(poisson_arrivals_s(1000, 100.0, seed=3), a / 2, rtol=1e-12)


@pytest.mark.parametrize("n, rate", [(0, 10.0), (-3, 10.0), (10, 0.0), (10, -1.0), (10, float("nan"))])
def test_arrivals_reject_bad_n_or_rate(n: int, rate: float) -> None:
    with pytest.raises(ConfigError, match=r"need (n >= 1|a finite rate_qps > 0)") as info:
        poisson_arrivals_s(n, rate, seed=0)
    assert (f"n={n}" if n < 1 else f"rate_qps={rate}") in str(info.value)


def test_arrivals_reject_infinite_rate() -> None:
    with pytest.raises(ConfigError):
        poisson_arrivals_s(10, float("inf"), seed=0)


def test_arrivals_bad_n_names_field_n() -> None:
    with pytest.raises(ConfigError) as info:
        poisson_arrivals_s(0, 10.0, seed=0)
    assert (info.value.field, info.value.value) == ("n", 0)


# ---- percentiles --------------------------------------------------------------------------------
def test_latency_summary_is_nearest_rank() -> None:
    values = np.random.default_rng(0).permutation(np.arange(1, 1002, dtype=np.float64))  # 1..1001, shuffled
    summary = latency_summary(values.tolist())
    for name, q in PERCENTILES.items():
        assert summary[name] == float(np.percentile(values, q, method="inverted_cdf"))
    assert summary["p50_ms"] == 501.0
    assert summary["p999_ms"] == 1000.0  # rank ceil(0.999 * 1001) = 1000
    assert summary["mean_ms"] == 501.0 and summary["max_ms"] == 1001.0


def test_failed_queries_count_as_infinite_latency() -> None:
    """2 failures in 1000 queries (0.2%) reach p99.9: no finite p99.9 can be reported."""
    fast = [1.0] * 998
    summary = latency_summary(fast, failed=2)
    assert summary["p99_ms"] == 1.0 and math.isinf(summary["p999_ms"])
    assert summary["mean_ms"] == 1.0 and summary["max_ms"] == 1.0  # over the answered ones
    assert latency_summary(fast + [1.0], failed=1)["p999_ms"] == 1.0  # 0.1%: just below the rank


def test_latency_summary_of_nothing_is_nan() -> None:
    summary = latency_summary([])
    assert set(summary) == {*PERCENTILES, "mean_ms", "max_ms"}
    assert all(math.isnan(v) for v in summary.values())


@pytest.fixture(scope="module")
def lognormal_ms() -> np.ndarray:
    return np.random.default_rng(5).lognormal(mean=1.0, sigma=1.0, size=100_000)  # (n,) ms


def nearest_rank(values: np.ndarray, q: float) -> float:
    """The ceil(q/100 * n)-th smallest, with q/100 * n taken exactly (0.999 * 100000 is 99900)."""
    from fractions import Fraction

    rank = max(1, -(-Fraction(str(q)) * len(values) // 100))
    return float(np.sort(values)[int(rank) - 1])


@pytest.mark.parametrize("q", [0, 1, 10, 50, 90, 99, 99.9, 99.99, 100])
def test_histogram_percentile_within_precision(lognormal_ms: np.ndarray, q: float) -> None:
    hist = LatencyHistogram()
    hist.record_many(lognormal_ms)
    exact = nearest_rank(lognormal_ms, q)
    assert abs(hist.percentile(q) - exact) <= hist.precision * exact


def test_histogram_summary_matches_exact(lognormal_ms: np.ndarray) -> None:
    hist = LatencyHistogram()
    hist.record_many(lognormal_ms)
    summary = hist.summary()
    for name, q in PERCENTILES.items():
        assert summary[name] == pytest.approx(nearest_rank(lognormal_ms, q), rel=hist.precision)
    assert summary["mean_ms"] == pytest.approx(lognormal_ms.mean(), rel=1e-9)
    assert summary["max_ms"] == lognormal_ms.max()
    assert hist.total == lognormal_ms.size


def test_histogram_record_and_record_many_agree(lognormal_ms: np.ndarray) -> None:
    one, many = LatencyHistogram(), LatencyHistogram()
    for v in lognormal_ms[:5000]:
        one.record(float(v))
    many.record_many(lognormal_ms[:5000].tolist())  # a plain list works too
    np.testing.assert_array_equal(one.counts, many.counts)
    assert (one.total, one.max_seen_ms) == (many.total, many.max_seen_ms)
    assert one.sum_ms == pytest.approx(many.sum_ms, rel=1e-12)


def test_histogram_merge_equals_recording_everything(lognormal_ms: np.ndarray) -> None:
    parts = np.array_split(lognormal_ms, 3)
    merged = LatencyHistogram()
    for part in parts:
        h = LatencyHistogram()
        h.record_many(part)
        merged.merge(h)
    whole = LatencyHistogram()
    whole.record_many(lognormal_ms)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert merged.total == whole.total and merged.max_seen_ms == whole.max_seen_ms
    assert merged.sum_ms == pytest.approx(whole.sum_ms, rel=1e-12)
    for q in (50, 99, 99.9):
        assert merged.percentile(q) == whole.percentile(q)


def test_histogram_merge_refuses_other_layouts() -> None:
    with pytest.raises(ConfigError, match="different bucket layouts"):
        LatencyHistogram().merge(LatencyHistogram(precision=0.01))


def test_empty_histogram_is_nan() -> None:
    hist = LatencyHistogram()
    assert math.isnan(hist.percentile(50))
    hist.record_many([])
    assert hist.total == 0
    assert all(math.isnan(v) for v in hist.summary().values())


def test_histogram_clamps_out_of_range_values() -> None:
    hist = LatencyHistogram(min_ms=1.0, max_ms=100.0, precision=0.01)
    hist.record_many([0.0, 0.5, 5000.0])
    assert hist.total == 3
    assert hist.percentile(100) <= 5000.0
    assert hist.percentile(10) == pytest.approx(1.0, rel=0.01)  # below min_ms: the first bucket


@pytest.mark.parametrize("kwargs", [{"min_ms": 0.0}, {"min_ms": 5.0, "max_ms": 1.0}, {"precision": 0.0},
                                    {"precision": 0.5}])
def test_histogram_rejects_bad_layout(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        LatencyHistogram(**kwargs)


# ---- open loop: latency from the scheduled time -----------------------------------------------
class ScriptedServer:
    """A single FIFO server on the running (virtual-time) loop, with knobs.

    ``service_s[i]``: service time of the i-th submitted query (else ``default_s``).
    ``block_s[i]``: the i-th ``submit`` call blocks the sender this long before the query is
    queued (the virtual clock is advanced inside the call, as if the call itself took that long).
    ``reject``: indices whose submit raises OverloadedError. ``fail``: indices whose future fails.
    ``swallow``: indices whose future is never resolved.
    ``answered_s[i]``: when query i's answer was delivered.
    """

    def __init__(self, *, default_s: float = 0.01, service_s: dict[int, float] | None = None,
                 block_s: dict[int, float] | None = None, reject: set[int] = frozenset(),
                 fail: set[int] = frozenset(), swallow: set[int] = frozenset()) -> None:
        self.default_s, self.service_s, self.block_s = default_s, service_s or {}, block_s or {}
        self.reject, self.fail, self.swallow = reject, fail, swallow
        self.free_at = -math.inf
        self.calls = 0
        self.queued_s: dict[int, float] = {}
        self.answered_s: dict[int, float] = {}

    def submit(self, query: torch.Tensor) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        i, self.calls = self.calls, self.calls + 1
        if i in self.block_s:
            loop.advance(self.block_s[i])  # the sender is stuck in this call
        if i in self.reject:
            raise OverloadedError("scripted rejection", limit="test")
        now = loop.time()
        self.queued_s[i] = now
        self.free_at = max(now, self.free_at) + self.service_s.get(i, self.default_s)
        self.answered_s[i] = self.free_at
        future = loop.create_future()
        if i in self.swallow:
            return future  # never resolved: a server that loses the query
        if i in self.fail:
            loop.call_at(self.free_at, future.set_exception, ServingError("scripted failure"))
        else:
            pred = Prediction(torch.zeros(2), int(query.sum()), Source.ORIGINAL, 0.0, instance=0)
            loop.call_at(self.free_at, future.set_result, pred)
        return future


def _open_loop(server: ScriptedServer, arrivals_s: list[float], queries: torch.Tensor | None = None,
               ) -> tuple[list[QueryResult], float]:
    """Run the open loop on the virtual loop; returns the records and the wall time it took."""
    qs = torch.zeros(len(arrivals_s), 1) if queries is None else queries

    async def main() -> list[QueryResult]:
        return await run_open_loop(server.submit, qs, np.asarray(arrivals_s),
                                   clock=asyncio.get_running_loop().time, answer_timeout_s=3600)

    started = time.monotonic()
    results = run_virtual(main())
    return results, time.monotonic() - started


def test_queries_behind_a_stall_count_from_their_scheduled_time() -> None:
    """Query 0 takes 1 s; queries 1-3 queue behind it. The open loop still sends each on schedule
    and each latency is answered - scheduled (large), not answered - sent-on-time-but-queued."""
    server = ScriptedServer(service_s={0: 1.0})
    results, wall_s = _open_loop(server, [0.0, 0.1, 0.2, 0.3, 2.0])
    assert wall_s < 2.0  # virtual time: the 2 s schedule did not really pass
    t0 = results[0].scheduled_s
    assert [round(r.scheduled_s - t0, 9) for r in results] == [0.0, 0.1, 0.2, 0.3, 2.0]
    for r in results:
        assert r.sent_s == pytest.approx(r.scheduled_s, abs=1e-9), "the stall held the sender back"
        assert r.answered_s == pytest.approx(server.answered_s[r.index], abs=1e-9)
        assert r.latency_ms == pytest.approx((r.answered_s - r.scheduled_s) * 1e3, abs=1e-9)
    assert [r.latency_ms for r in results] == pytest.approx([1000.0, 910.0, 820.0, 730.0, 10.0], abs=1e-6)


def test_a_send_delayed_by_a_blocked_sender_counts_from_its_schedule() -> None:
    """submit #1 blocks the sender for 0.5 s: queries 2 and 3 go out late (at 0.6 s) but their
    latency still counts from 0.2 s and 0.3 s."""
    server = ScriptedServer(block_s={1: 0.5})
    results, _ = _open_loop(server, [0.0, 0.1, 0.2, 0.3])
    t0 = results[0].scheduled_s
    rel = lambda t: round(t - t0, 9)  # noqa: E731
    assert [rel(r.sent_s) for r in results] == [0.0, 0.1, 0.6, 0.6]
    assert [rel(r.answered_s) for r in results] == [0.01, 0.61, 0.62, 0.63]
    assert [r.latency_ms for r in results] == pytest.approx([10.0, 510.0, 420.0, 330.0], abs=1e-6)
    late = results[2]
    assert (late.answered_s - late.sent_s) * 1e3 == pytest.approx(20.0, abs=1e-6)  # what coordinated omission reports


def test_open_loop_records_rejections_and_errors() -> None:
    queries = torch.arange(4, dtype=torch.float32)[:, None]  # (4, 1): query i has label i
    server = ScriptedServer(reject={1}, fail={2})
    results, _ = _open_loop(server, [0.0, 0.05, 0.1, 0.15], queries)
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert [(r.outcome, r.source) for r in results] == [("ok", "original"), ("rejected", "error"),
                                                       ("error", "error"), ("ok", "original")]
    assert results[1].latency_ms == pytest.approx(0.0, abs=1e-9) and "scripted rejection" in results[1].error
    assert "scripted failure" in results[2].error
    assert [r.label for r in results] == [0, None, None, 3]


def test_open_loop_counts_a_query_never_answered_as_lost_and_ends_on_time() -> None:
    server = ScriptedServer(swallow={1})

    async def main() -> tuple[RecordSink, float]:
        loop = asyncio.get_running_loop()
        sink = await drive_open_loop(server.submit, torch.zeros(3, 1), [0.0, 0.1, 0.1], RecordSink(), clock=loop.time,
                                     answer_timeout_s=2.0)
        return sink, loop.time()

    sink, ended_s = run_virtual(main())
    results = sink.records
    assert [r.outcome for r in results] == ["ok", "lost", "ok"]
    assert math.isinf(results[1].latency_ms) and "answer_timeout_s=2.0" in results[1].error
    assert ended_s == pytest.approx(results[0].scheduled_s + 0.2 + 2.0, abs=1e-6)  # last send + answer timeout
    assert sink.elapsed_s == pytest.approx(0.2 + 2.0, abs=1e-6)
    s = summarize([sink])
    assert (s["ok"], s["lost"]) == (2, 1) and math.isinf(s["p99_ms"])


def _drive_scripted(sink: Sink, gaps: list[float]) -> Sink:
    """Queries into ``sink``: 0 takes 1 s, 2 is refused, 3 takes 0.5 s, 4 fails, 5 is never answered."""
    server = ScriptedServer(service_s={0: 1.0, 3: 0.5}, reject={2}, fail={4}, swallow={5})

    async def main() -> Sink:
        return await drive_open_loop(server.submit, torch.zeros(len(gaps), 1), gaps, sink,
                                     clock=asyncio.get_running_loop().time, answer_timeout_s=2.0, lead_s=0.0)

    return run_virtual(main())


def test_one_driver_feeds_records_and_histograms_alike() -> None:
    """Real runs keep records, the simulator a histogram: the same driver, the same counts and
    sources, the same percentiles (to the histogram's precision), warmup dropped by both."""
    gaps = [0.0] + [0.1] * 7
    records, hist = _drive_scripted(RecordSink(warmup=1), gaps), _drive_scripted(HistogramSink(warmup=1), gaps)
    assert isinstance(records, RecordSink) and isinstance(hist, HistogramSink)
    for sink in (records, hist):
        assert (sink.queries, sink.ok, sink.errors, sink.rejected, sink.lost) == (7, 4, 1, 1, 1)
        assert sink.sources == {"original": 4, "error": 2, "lost": 1}
    assert len(records.records) == 8 and hist.histogram.total == 4  # records keep the warmup; the histogram not
    exact, binned = summarize([records]), summarize([hist])
    for key in ("queries", "ok", "errors", "rejected", "lost", "sources", "reconstructed_fraction"):
        assert exact[key] == binned[key], key
    for key in ("p50_ms", "mean_ms", "max_ms"):
        assert binned[key] == pytest.approx(exact[key], rel=hist.histogram.precision), key
    assert math.isfinite(exact["p50_ms"]) and math.isinf(exact["p99_ms"]) and math.isinf(binned["p99_ms"])


def test_an_answer_after_the_cutoff_does_not_resurrect_a_lost_query() -> None:
    server = ScriptedServer(service_s={0: 5.0})  # answered 5 s after a 1 s cutoff

    async def main() -> list[QueryResult]:
        results = await run_open_loop(server.submit, torch.zeros(1, 1), np.array([0.0]),
                                      clock=asyncio.get_running_loop().time, answer_timeout_s=1.0)
        await asyncio.sleep(10)  # the answer comes now
        return results

    assert [r.outcome for r in run_virtual(main())] == ["lost"]


def test_open_loop_through_the_frontend_counts_frontend_queueing() -> None:
    """The real Frontend over a FakeBackend with one data instance taking one batch at a time:
    its 2nd batch takes 2 s; queries 2 and 3 wait in the frontend, are sent to the instance only
    at 2.1 s, and their latency still counts from when the load generator scheduled them."""
    backend = FakeBackend(specs_for(instance_roles("none", 1, 2), (1,), 2, 2), delay_s=0.01)
    backend.script(0, 1, 2.0)

    async def main() -> list[QueryResult]:
        loop = asyncio.get_running_loop()
        config = ServingConfig((1,), mode="none", max_in_flight=1, stall_timeout_ms=60_000, deadline_ms=60_000)
        frontend = Frontend(config, backend, clock=loop.time)
        await frontend.start()
        try:
            return await run_open_loop(frontend.submit, torch.zeros(4, 1), np.array([0.0, 0.1, 0.2, 0.3]),
                                       clock=loop.time, answer_timeout_s=60)
        finally:
            await frontend.stop()

    results = run_virtual(main())
    t0 = results[0].scheduled_s
    assert [round(r.sent_s - t0, 9) for r in results] == [0.0, 0.1, 0.2, 0.3]
    assert [r.source for r in results] == ["original"] * 4
    assert [r.latency_ms for r in results] == pytest.approx([10.0, 2000.0, 1910.0, 1820.0], abs=1e-6)
    assert [s.nth for s in backend.sends] == [0, 1, 2, 3]


# ---- summarize ----------------------------------------------------------------------------------
def _rec(i: int, latency_ms: float, source: str = "original", outcome: str = "ok", label: int | None = 0
         ) -> QueryResult:
    return QueryResult(i, 10.0 + i, 10.0 + i, 10.0 + i + latency_ms / 1e3, source, outcome, label, 0)


def _sink(records: list[QueryResult], warmup: int = 0) -> RecordSink:
    """A RecordSink given these outcomes, as the driver reports them."""
    sink = RecordSink(warmup)
    for r in records:
        if r.outcome == "ok":
            pred = Prediction(torch.zeros(2), r.label, Source(r.source), r.latency_ms, r.instance)
            sink.answered(r.index, r.scheduled_s, r.sent_s, r.answered_s, pred)
        else:
            sink.failed(r.index, r.scheduled_s, r.sent_s, r.answered_s, r.outcome, "scripted")
    return sink


def test_summarize_discards_warmup_and_counts_everything() -> None:
    labels = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    records = [
        _rec(0, 999.0, label=1),  # warmup: wrong and slow, ignored
        _rec(1, 999.0, label=0),  # warmup
        _rec(2, 10.0, label=0),  # ok, right
        _rec(3, 20.0, label=0),  # ok, wrong
        _rec(4, 30.0, "reconstructed", label=0),  # right
        _rec(5, 40.0, "reconstructed", label=0),  # wrong
        _rec(6, 50.0, "reconstructed", label=0),  # right
        _rec(7, 0.0, "error", "rejected", None),
        _rec(8, 5.0, "error", "error", None),
        _rec(9, math.inf, "lost", "lost", None),  # no outcome by the cutoff
    ]
    s = summarize([_sink(records, warmup=2)], labels=labels)
    assert s["queries"] == 8 and s["answered"] == 5 and s["ok"] == 5
    assert (s["errors"], s["rejected"], s["lost"]) == (1, 1, 1)
    assert s["sources"] == {"original": 2, "reconstructed": 3, "error": 2, "lost": 1}
    assert s["reconstructed_fraction"] == pytest.approx(3 / 8)
    # 5 answered + 3 failed (+inf): the median is the 4th smallest, the tail is infinite
    assert s["p50_ms"] == pytest.approx(40.0) and math.isinf(s["p999_ms"])
    assert s["max_ms"] == pytest.approx(50.0) and s["mean_ms"] == pytest.approx(30.0)  # answered only
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["accuracy_original"] == pytest.approx(1 / 2)
    assert s["accuracy_reconstructed"] == pytest.approx(2 / 3)
    assert "accuracy_error" not in s
    assert s["trials"] == 1 and s["per_trial"] == [{k: s[k] for k in ("p50_ms", "p99_ms", "p999_ms")}]


def test_summarize_labels_wrap_like_the_queries() -> None:
    # the load generator sends queries[i % len(queries)]; accuracy uses labels[i % len(labels)]
    records = [_rec(i, 1.0, label=i % 3) for i in range(9)]
    assert summarize([_sink(records)], labels=[0, 1, 2])["accuracy"] == 1.0


def test_summarize_without_labels_or_answers() -> None:
    s = summarize([_sink([_rec(0, 0.0, "error", "error", None), _rec(1, math.inf, "lost", "lost", None),
                          _rec(2, math.inf, "lost", "lost", None)])])
    assert "accuracy" not in s
    assert s["lost"] == 2 and s["errors"] == 1 and s["answered"] == 0
    assert math.isinf(s["p50_ms"])  # every query failed


def test_summarize_pools_trials_and_weights_accuracy_by_answers() -> None:
    one = _sink([_rec(i, 10.0, label=0) for i in range(4)])  # 4 answered, all right
    two = _sink([_rec(0, 30.0, label=1), _rec(1, 0.0, "error", "error", None)])  # 1 answered, wrong; 1 failed
    one.restarts, two.restarts = 0, 2
    s = summarize([one, two], labels=[0])
    assert (s["trials"], s["queries"], s["ok"], s["errors"], s["restarts"]) == (2, 6, 5, 1, 2)
    assert s["accuracy"] == pytest.approx(4 / 5)
    assert s["p50_ms"] == pytest.approx(10.0) and math.isinf(s["p999_ms"])  # pooled: 10 10 10 10 30 inf
    assert [t["p50_ms"] for t in s["per_trial"]] == pytest.approx([10.0, 30.0])


# ---- experiment files ---------------------------------------------------------------------------
GOOD = """\
name = "tiny"
description = "a test experiment"
modes = ["none", "equal", "coded"]
[system]
base = "runs/base"
parity = "runs/k2"
instances = 3
k = 2
batch_size = 2
[load]
queries = 500
rate = 120
warmup = 10
trials = 2
seed = 4
[faults]
seed = 9
[[faults.fault]]
kind = "slow"
rate_hz = 0.1
duration_s = 1.0
factor = 20
[[faults.fault]]
kind = "crash"
instance = 1
at_s = 8
[simulate]
instances = 12
queries = 1000
rates = [150, 210]
[simulate.service]
kind = "constant"
median_ms = 20.0
"""


def _write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_good_experiment(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    exp = load_experiment(path)
    assert exp.name == "tiny" and exp.modes == ("none", "equal", "coded")
    assert exp.system["instances"] == 3 and exp.load["rate"] == 120
    assert exp.faults is not None and exp.faults.seed == 9
    assert [type(f) for f in exp.faults.faults] == [SlowEpisodes, Crash]
    assert exp.simulate["service"] == {"kind": "constant", "median_ms": 20.0}
    assert exp.source == str(path) and exp.sweep == {}
    assert exp.to_json()["faults"]["seed"] == 9


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    exp = load_experiment(_write(tmp_path, 'modes = ["none"]\n', "my-run.toml"))
    assert exp.name == "my-run" and exp.faults is None


@pytest.mark.parametrize("text, field, words", [
    ('bogus = 1\nmodes = ["none"]\n', "experiment", ["unknown top-level key", "bogus"]),
    ('modes = ["none", "turbo"]\n', "modes", ["unknown mode", "turbo"]),
    ('[sweep]\nks = [2, 4]\nbatch_sizes = [1, 2]\n', "sweep", ["one knob at a time", "batch_sizes", "ks"]),
    ('[sweep]\nrate_list = [1, 2]\n', "sweep.rate_list", ["unknown key", "rate_list"]),
    ('modes = ["none"\n', "experiment", ["not valid TOML"]),
    ('[faults]\n[[faults.fault]]\nkind = "meltdown"\n', None, ["meltdown"]),
])
def test_experiment_errors_name_file_and_field(tmp_path: Path, text: str, field: str | None,
                                               words: list[str]) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert str(path) in message, message
    for word in words:
        assert word in message, message
    if field is not None:
        assert info.value.field == field


def test_missing_experiment_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_experiment(path)
    assert str(path) in str(info.value) and info.value.field == "experiment"


def test_unknown_key_inside_a_section_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, '[load]\nquerys = 300\nrate = 10\n')
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert str(path) in str(info.value) and "querys" in str(info.value)


def test_points_without_a_sweep(tmp_path: Path) -> None:
    exp = load_experiment(_write(tmp_path, GOOD))
    (point,) = exp.points()
    assert (point.rate, point.k, point.batch_size, point.label) == (120.0, 2, 2, "120qps")
    assert point.faults == exp.faults
    assert point.to_json()["faults"] == exp.faults.to_text()


def test_points_rates_in_load_and_in_sweep(tmp_path: Path) -> None:
    in_load = load_experiment(_write(tmp_path, '[load]\nrates = [100, 150]\n', "a.toml"))
    in_sweep = load_experiment(_write(tmp_path, '[sweep]\nrates = [50, 75.5]\n', "b.toml"))
    assert [(p.rate, p.label) for p in in_load.points()] == [(100.0, "100qps"), (150.0, "150qps")]
    assert [(p.rate, p.label) for p in in_sweep.points()] == [(50.0, "50qps"), (75.5, "75.5qps")]
    assert [p.rate for p in load_experiment(_write(tmp_path, "", "c.toml")).points()] == [100.0]  # default


def test_points_simulated_take_simulate_rates(tmp_path: Path) -> None:
    exp = load_experiment(_write(tmp_path, GOOD))
    assert [p.rate for p in exp.points(simulated=True)] == [150.0, 210.0]
    one = load_experiment(_write(tmp_path, '[load]\nrates = [1, 2]\n[simulate]\nrate = 300\n', "d.toml"))
    assert [p.rate for p in one.points(simulated=True)] == [300.0]


def test_points_ks_and_batch_sizes(tmp_path: Path) -> None:
    ks = load_experiment(_write(tmp_path, GOOD + "[sweep]\nks = [2, 3, 4]\n", "ks.toml"))
    assert [(p.k, p.rate, p.batch_size, p.label) for p in ks.points()] == [
        (2, 120.0, 2, "k=2"), (3, 120.0, 2, "k=3"), (4, 120.0, 2, "k=4")]
    bs = load_experiment(_write(tmp_path, GOOD + "[sweep]\nbatch_sizes = [1, 4]\n", "bs.toml"))
    assert [(p.batch_size, p.k, p.label) for p in bs.points()] == [(1, 2, "B=1"), (4, 2, "B=4")]


def test_points_slow_rates_scale_only_the_slow_fault(tmp_path: Path) -> None:
    exp = load_experiment(_write(tmp_path, GOOD + "[sweep]\nslow_rates_hz = [0.05, 0.2]\n"))
    points = exp.points()
    assert [p.label for p in points] == ["slow=0.05Hz", "slow=0.2Hz"]
    for point, rate in zip(points, (0.05, 0.2)):
        slow, crash = point.faults.faults
        assert isinstance(slow, SlowEpisodes) and slow.rate_hz == rate
        assert (slow.duration_s, slow.factor) == (1.0, 20.0)
        assert crash == exp.faults.faults[1]
        assert point.faults.seed == 9


def test_slow_rate_sweep_needs_a_slow_fault(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a 'slow' fault"):
        load_experiment(_write(tmp_path, "[sweep]\nslow_rates_hz = [0.1]\n"))


def test_slow_rate_sweep_without_slow_fault_fails_at_load(tmp_path: Path) -> None:
    path = _write(tmp_path, "[sweep]\nslow_rates_hz = [0.1]\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert str(path) in str(info.value)


def test_with_overrides(tmp_path: Path) -> None:
    exp = load_experiment(_write(tmp_path, GOOD + "[sweep]\nrates = [10, 20]\n"))
    over = exp.with_overrides(modes=["coded"], queries=77, trials=5, rate=33.0)
    assert over.modes == ("coded",)
    assert (over.load["queries"], over.load["trials"], over.load["rate"]) == (77, 5, 33.0)
    assert [p.rate for p in over.points()] == [33.0]  # replaces the rate sweep
    assert exp.load["queries"] == 500 and exp.modes == ("none", "equal", "coded")  # the original is unchanged
    assert exp.with_overrides() == exp  # nothing given: nothing changes
    with pytest.raises(ConfigError, match="unknown mode"):
        exp.with_overrides(modes=["warp"])


def test_rate_override_replaces_rates_in_load(tmp_path: Path) -> None:
    exp = load_experiment(_write(tmp_path, '[load]\nrates = [100, 150, 200]\n'))
    assert [p.rate for p in exp.with_overrides(rate=50.0).points()] == [50.0]
