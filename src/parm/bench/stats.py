"""Latency and accuracy statistics of a run, from its query records."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from parm.bench.loadgen import QueryResult

PERCENTILES = {"p50_ms": 50.0, "p90_ms": 90.0, "p99_ms": 99.0, "p999_ms": 99.9}


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9 (numpy's linear interpolation), mean and max, in milliseconds."""
    values = np.asarray(latencies_ms, dtype=np.float64)
    if values.size == 0:
        return {**{k: float("nan") for k in PERCENTILES}, "mean_ms": float("nan"), "max_ms": float("nan")}
    out = {name: float(np.percentile(values, q)) for name, q in PERCENTILES.items()}
    out["mean_ms"], out["max_ms"] = float(values.mean()), float(values.max())
    return out


def summarize(results: Sequence[QueryResult], total: int, *, labels: Sequence[int] | None = None,
              warmup: int = 0) -> dict[str, Any]:
    """Summary of the records of queries ``warmup``..``total``-1 (by send order).

    ``lost`` counts queries with no record at all — neither an answer nor an error.
    """
    kept = [r for r in results if r.index >= warmup]
    ok = [r for r in kept if r.outcome == "ok"]
    sources: dict[str, int] = {}
    for r in kept:
        sources[r.source] = sources.get(r.source, 0) + 1
    summary: dict[str, Any] = {
        **latency_summary([r.latency_ms for r in ok]),
        "queries": len(kept),
        "answered": len(ok),
        "errors": sum(r.outcome == "error" for r in kept),
        "rejected": sum(r.outcome == "rejected" for r in kept),
        "lost": (total - warmup) - len(kept),
        "sources": sources,
        "reconstructed_fraction": sources.get("reconstructed", 0) / max(len(kept), 1),
    }
    if labels is not None and ok:
        correct = [r.label == labels[r.index % len(labels)] for r in ok]
        summary["accuracy"] = float(np.mean(correct))
        for source in sources:
            picked = [c for c, r in zip(correct, ok) if r.source == source]
            if picked:
                summary[f"accuracy_{source}"] = float(np.mean(picked))
    return summary
