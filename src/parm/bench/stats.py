"""Latency and accuracy statistics of a run, from its query records.

Every query of the measured window counts: it is ``ok`` (answered), ``error`` (failed,
including a deadline exceeded), ``rejected`` (refused at submission: overload) or ``lost`` (no
answer and no error by the run's cutoff). Percentiles are nearest-rank over all of them, a
query that was not ``ok`` counting as +∞: a mode that fails 0.2% of its queries cannot report a
finite p99.9. ``mean_ms`` and ``max_ms`` are over the answered queries.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from parm.bench.intervals import PERCENTILES
from parm.bench.loadgen import QueryResult

OUTCOMES = ("ok", "error", "rejected", "lost")


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


def failed_as_inf(results: Sequence[QueryResult], warmup: int = 0, missing: int = 0) -> list[float]:
    """The latencies of queries ``warmup``.. with every query not answered as +∞ (``missing``:
    queries with no record at all, counted as lost)."""
    kept = [r for r in results if r.index >= warmup]
    return [r.latency_ms if r.outcome == "ok" else math.inf for r in kept] + [math.inf] * missing


def summarize(results: Sequence[QueryResult], total: int, *, labels: Sequence[int] | None = None,
              warmup: int = 0) -> dict[str, Any]:
    """Summary of the records of queries ``warmup``..``total``-1 (by send order).

    ``lost`` counts queries recorded as lost plus those with no record at all.
    """
    kept = [r for r in results if r.index >= warmup]
    ok = [r for r in kept if r.outcome == "ok"]
    queries = total - warmup
    sources: dict[str, int] = {}
    for r in kept:
        sources[r.source] = sources.get(r.source, 0) + 1
    counts = {outcome: sum(r.outcome == outcome for r in kept) for outcome in OUTCOMES}
    counts["lost"] += queries - len(kept)
    summary: dict[str, Any] = {
        **latency_summary([r.latency_ms for r in ok], failed=queries - len(ok)),
        "queries": queries,
        "answered": len(ok),
        "ok": counts["ok"],
        "errors": counts["error"],
        "rejected": counts["rejected"],
        "lost": counts["lost"],
        "sources": sources,
        "reconstructed_fraction": sources.get("reconstructed", 0) / max(queries, 1),
    }
    if labels is not None and ok:
        correct = [r.label == labels[r.index % len(labels)] for r in ok]
        summary["accuracy"] = float(np.mean(correct))
        for source in sources:
            picked = [c for c, r in zip(correct, ok) if r.source == source]
            if picked:
                summary[f"accuracy_{source}"] = float(np.mean(picked))
    return summary
