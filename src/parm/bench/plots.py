"""PNG plots of benchmark results (optional dependency: matplotlib, ``pip install "parm-serving[plot]"``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
    raise ImportError('plots need matplotlib: pip install "parm-serving[plot]"') from exc

from parm.bench.histogram import LatencyHistogram


def _tail_curve(tail: list[float] | LatencyHistogram) -> tuple[np.ndarray, np.ndarray]:
    """(latency_ms, fraction of queries slower) for a log-log tail plot."""
    if isinstance(tail, LatencyHistogram):
        counts = tail.counts
        nz = np.nonzero(counts)[0]
        edges = tail.min_ms * np.exp((nz + 1) * tail._log_base)
        slower = 1.0 - np.cumsum(counts[nz]) / max(tail.total, 1)
        return edges, np.maximum(slower, 0.5 / max(tail.total, 1))
    values = np.sort(np.asarray(tail, dtype=np.float64))
    slower = 1.0 - np.arange(1, len(values) + 1) / max(len(values), 1)
    return values, np.maximum(slower, 0.5 / max(len(values), 1))


def plot_cdf(path: Path, title: str, tails: dict[str, list[float] | LatencyHistogram]) -> None:
    """Latency tail per mode (``tails``: each mode's latencies, a list with +∞ for failed queries
    or a histogram): fraction of queries slower than x, both axes logarithmic."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode, tail in tails.items():
        x, y = _tail_curve(tail)
        if len(x):
            ax.plot(x, y, label=mode, drawstyle="steps-post")
    ax.set(xscale="log", yscale="log", xlabel="latency (ms)", ylabel="fraction of queries slower",
           title=f"latency tail {title}")
    ax.axhline(1e-3, color="grey", lw=0.5, ls=":")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(points: list[dict[str, Any]], mode: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Values of ``key`` for ``mode`` across the sweep (NaN where missing or infinite) and their
    error bars (2, n) from ``key_ci`` (zero where there is no finite interval)."""
    values, bars = [], []
    for p in points:
        stats = p["modes"].get(mode, {})
        v = stats.get(key)
        v = np.nan if v is None or not np.isfinite(v) else float(v)
        ci = stats.get(f"{key}_ci") or [None, None]
        low = v - ci[0] if ci[0] is not None and np.isfinite(ci[0]) and np.isfinite(v) else 0.0
        high = ci[1] - v if ci[1] is not None and np.isfinite(ci[1]) and np.isfinite(v) else 0.0
        values.append(v)
        bars.append((max(low, 0.0), max(high, 0.0)))
    return np.asarray(values), np.asarray(bars).T.reshape(2, -1)


def plot_sweep(out: Path, points: list[dict[str, Any]]) -> None:
    """p99.9 and median per mode across the sweep, and coded's gap ratio against each baseline,
    each with its 95% interval as error bars."""
    labels = [p["point"]["label"] for p in points]
    x = np.arange(len(labels))
    modes = list(points[0]["modes"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode in modes:
        y, err = _series(points, mode, "p999_ms")
        line = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{mode} p99.9")[0]
        y, err = _series(points, mode, "p50_ms")
        ax.errorbar(x, y, yerr=err, marker=".", ls="--", capsize=2, color=line.get_color(), label=f"{mode} p50")
    ax.set(yscale="log", ylabel="latency (ms)", title="median and p99.9 across the sweep (95% CI)")
    ax.set_xticks(x, labels)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "sweep_latency.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode in modes:
        if mode == "coded" or "coded" not in points[0]["modes"]:
            continue
        y, err = _series([{"modes": {"c": p["modes"].get("coded", {})}} for p in points], "c",
                         f"gap_ratio_vs_{mode}")
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"vs {mode}")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set(ylabel="(p99.9 - p50) of baseline / of coded", title="ParM's tail gap advantage (95% CI)")
    ax.set_xticks(x, labels)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sweep_gap_ratio.png", dpi=110)
    plt.close(fig)


def plot_tradeoff(out: Path, points: list[dict[str, Any]]) -> None:
    """Latency against accuracy across a sweep of a serving setting (e.g. when reconstructions
    are accepted): one marker per point and coded mode, tail gap p99.9 − p50 on y (error bars:
    p99.9's 95% interval) and the accuracy of the answers on x."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    modes = [m for m in points[0]["modes"] if any("accuracy" in p["modes"].get(m, {}) for p in points)]
    for mode in modes:
        xs, ys, bars, labels = [], [], [], []
        for p in points:
            s = p["modes"].get(mode, {})
            p50, p999 = s.get("p50_ms"), s.get("p999_ms")
            if s.get("accuracy") is None or p50 is None or p999 is None or not np.isfinite(p999):
                continue
            ci = s.get("p999_ms_ci") or [p999, p999]
            xs.append(s["accuracy"])
            ys.append(p999 - p50)
            bars.append((max(p999 - (ci[0] if ci[0] is not None else p999), 0.0),
                         max((ci[1] if ci[1] is not None and np.isfinite(ci[1]) else p999) - p999, 0.0)))
            labels.append(p["point"]["label"])
        if not xs:
            continue
        ax.errorbar(xs, ys, yerr=np.asarray(bars).T, marker="o", capsize=3, label=mode)
        for x, y, text in zip(xs, ys, labels):
            ax.annotate(text, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(yscale="log", xlabel="accuracy of the answers (top-1 vs labels)", ylabel="p99.9 - p50 (ms)",
           title="latency / accuracy trade-off (bars: p99.9's 95% CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=110)
    plt.close(fig)

