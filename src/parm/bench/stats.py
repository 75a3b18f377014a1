"""A mode's summary from what its runs collected, real (records) or simulated (histograms) alike.

Every measured query counts: it is ``ok`` (answered), ``error`` (failed, including a deadline
exceeded), ``rejected`` (refused at submission: overload) or ``lost`` (no answer and no error by
the run's cutoff). Percentiles are nearest-rank over all of them, a query that was not ``ok``
counting as +∞: a mode that fails 0.2% of its queries cannot report a finite p99.9. ``mean_ms``
and ``max_ms`` are over the answered queries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from parm.bench.histogram import LatencyHistogram
from parm.bench.intervals import PERCENTILES, TrialCounts
from parm.bench.loadgen import HistogramSink, RecordSink, Sink

COUNTS = ("queries", "ok", "errors", "rejected", "lost")


def nearest_rank(values: np.ndarray, q: float) -> float:
    """The ⌈q/100 · n⌉-th smallest of ``values`` (sorted, +∞ allowed); NaN when empty."""
    if values.size == 0:
        return float("nan")
    return float(values[max(1, math.ceil(round(q / 100.0 * values.size, 9))) - 1])


def latency_summary(latencies_ms: Sequence[float], failed: int = 0) -> dict[str, float]:
    """p50/p90/p99/p99.9 (nearest rank) over the answered latencies plus ``failed`` × +∞;
    mean and max of the answered ones, in milliseconds."""
    answered = np.asarray(latencies_ms, dtype=np.float64)
    values = np.sort(np.concatenate([answered, np.full(failed, np.inf)]))
    out = {name: nearest_rank(values, q) for name, q in PERCENTILES.items()}
    out["mean_ms"] = float(answered.mean()) if answered.size else float("nan")
    out["max_ms"] = float(answered.max()) if answered.size else float("nan")
    return out


def pooled_latencies(trials: Sequence[Sink]) -> list[float] | LatencyHistogram:
    """Every trial's measured latencies together (for figures and plots): a list with +∞ for each
    query not answered, from record sinks; one merged histogram, from histogram sinks."""
    records, hists = _split(trials)
    if records:
        return [v for t in records for v in t.latencies_ms()]
    pooled = LatencyHistogram()
    for t in hists:
        pooled.merge(t.histogram)
    return pooled


def trial_counts(trials: Sequence[Sink]) -> TrialCounts:
    """The trials' latencies (failed as +∞) on a shared grid, for the paired bootstrap."""
    records, hists = _split(trials)
    if records:
        return TrialCounts.from_latencies([t.latencies_ms() for t in records])
    return TrialCounts.from_histograms([t.histogram for t in hists], [t.failed_queries for t in hists])


def _split(trials: Sequence[Sink]) -> tuple[list[RecordSink], list[HistogramSink]]:
    """(record sinks, histogram sinks): one of them holds every trial."""
    records = [t for t in trials if isinstance(t, RecordSink)]
    hists = [t for t in trials if isinstance(t, HistogramSink)]
    if len(records) != len(trials) and len(hists) != len(trials):
        raise TypeError(f"trials must be all RecordSinks or all HistogramSinks; got "
                        f"{sorted({type(t).__name__ for t in trials})}")
    return records, hists


def _latencies(pooled: list[float] | LatencyHistogram, failed: int) -> dict[str, float]:
    if isinstance(pooled, LatencyHistogram):
        return pooled.summary(failed=failed)
    return latency_summary([v for v in pooled if math.isfinite(v)], failed=failed)


def _accuracy(sink: RecordSink, labels: Sequence[int]) -> dict[str, float]:
    """Top-1 agreement with ``labels`` of the answered measured queries, overall and per source
    (query i is ``queries[i % n]``, so its label is ``labels[i % len(labels)]``)."""
    ok = [r for r in sink.records if r.index >= sink.warmup and r.outcome == "ok"]
    if not ok:
        return {}
    correct = [r.label == labels[r.index % len(labels)] for r in ok]
    out = {"accuracy": float(np.mean(correct))}
    for source in sorted({r.source for r in ok}):
        out[f"accuracy_{source}"] = float(np.mean([c for c, r in zip(correct, ok) if r.source == source]))
    return out


def _trial(sink: Sink, labels: Sequence[int] | None) -> dict[str, Any]:
    out: dict[str, Any] = {**_latencies(pooled_latencies([sink]), sink.failed_queries), "queries": sink.queries,
                           "ok": sink.ok, "errors": sink.errors, "rejected": sink.rejected, "lost": sink.lost,
                           "sources": sink.sources, "restarts": sink.restarts, "resends": sink.resends}
    if labels is not None and isinstance(sink, RecordSink):
        out.update(_accuracy(sink, labels))
    return out


def summarize(trials: Sequence[Sink], *, labels: Sequence[int] | None = None) -> dict[str, Any]:
    """A mode's summary over its trials (one sink per trial): counts and sources added up,
    percentiles of all trials pooled, ``per_trial`` p50/p99/p99.9, and — for record sinks given
    the test set's ``labels`` — accuracy, overall and per source, weighted by answered queries.

    Keys: ``queries``, ``ok``, ``errors``, ``rejected``, ``lost``, ``answered`` (= ok),
    ``sources``, ``reconstructed_fraction``, ``restarts`` and ``resends`` (None when no run reported them),
    ``accuracy*``, ``p50_ms`` … ``p999_ms``, ``mean_ms``, ``max_ms``, ``trials``, ``per_trial``.
    """
    if not trials:
        raise ValueError("summarize needs at least one trial")
    per = [_trial(t, labels) for t in trials]
    stats: dict[str, Any] = {key: sum(t[key] for t in per) for key in COUNTS}
    stats["answered"] = stats["ok"]
    stats["sources"] = {}
    for t in per:
        for source, count in t["sources"].items():
            stats["sources"][source] = stats["sources"].get(source, 0) + count
    stats["reconstructed_fraction"] = stats["sources"].get("reconstructed", 0) / max(stats["queries"], 1)
    restarts = [t["restarts"] for t in per if t["restarts"] is not None]
    stats["restarts"] = sum(restarts) if restarts else None  # instances that failed and came back
    resends = [t["resends"] for t in per if t["resends"] is not None]
    stats["resends"] = sum(resends) if resends else None  # data batches sent again, warm-up included
    for key in sorted({k for t in per for k in t if k.startswith("accuracy")}):
        weights = [t["ok"] for t in per if key in t]
        stats[key] = sum(t[key] * t["ok"] for t in per if key in t) / max(sum(weights), 1)
    stats.update(_latencies(pooled_latencies(trials), sum(t.failed_queries for t in trials)))
    stats["trials"] = len(trials)
    stats["per_trial"] = [{k: t[k] for k in ("p50_ms", "p99_ms", "p999_ms")} for t in per]
    return stats
