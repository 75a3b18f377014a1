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


def _tail_curve(latencies: list[float] | None, hist: LatencyHistogram | None) -> tuple[np.ndarray, np.ndarray]:
    """(latency_ms, fraction of queries slower) for a log-log tail plot."""
    if hist is not None:
        counts = hist.counts
        nz = np.nonzero(counts)[0]
        edges = hist.min_ms * np.exp((nz + 1) * hist._log_base)
        slower = 1.0 - np.cumsum(counts[nz]) / max(hist.total, 1)
        return edges, np.maximum(slower, 0.5 / max(hist.total, 1))
    values = np.sort(np.asarray(latencies or [], dtype=np.float64))
    slower = 1.0 - np.arange(1, len(values) + 1) / max(len(values), 1)
    return values, np.maximum(slower, 0.5 / max(len(values), 1))


def plot_cdf(path: Path, title: str, *, latencies: dict[str, list[float]] | None = None,
             histograms: dict[str, LatencyHistogram] | None = None) -> None:
    """Latency tail per mode: fraction of queries slower than x, both axes logarithmic."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode in (latencies or histograms or {}):
        x, y = _tail_curve((latencies or {}).get(mode), (histograms or {}).get(mode))
        if len(x):
            ax.plot(x, y, label=mode, drawstyle="steps-post")
    ax.set(xscale="log", yscale="log", xlabel="latency (ms)", ylabel="fraction of queries slower",
           title=f"latency tail {title}")
    ax.axhline(1e-3, color="grey", lw=0.5, ls=":")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(out: Path, points: list[dict[str, Any]]) -> None:
    """p99.9 and median per mode across the sweep, and coded's gap ratio against each baseline."""
    labels = [p["point"]["label"] for p in points]
    modes = list(points[0]["modes"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode in modes:
        line = ax.plot(labels, [p["modes"].get(mode, {}).get("p999_ms", np.nan) for p in points], marker="o",
                       label=f"{mode} p99.9")[0]
        ax.plot(labels, [p["modes"].get(mode, {}).get("p50_ms", np.nan) for p in points], marker=".", ls="--",
                color=line.get_color(), label=f"{mode} p50")
    ax.set(yscale="log", ylabel="latency (ms)", title="median and p99.9 across the sweep")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "sweep_latency.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode in modes:
        if mode == "coded":
            continue
        ax.plot(labels, [p["modes"].get("coded", {}).get(f"gap_ratio_vs_{mode}") or np.nan for p in points],
                marker="o", label=f"vs {mode}")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set(ylabel="(p99.9 - p50) of baseline / of coded", title="ParM's tail gap advantage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sweep_gap_ratio.png", dpi=110)
    plt.close(fig)
