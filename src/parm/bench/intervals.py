"""Latency percentiles over trials with 95% intervals: a paired percentile bootstrap.

Every trial of an experiment draws its own fault realisation and arrival times, and every mode
of one trial sees the same ones. A figure is computed from all trials pooled (each query's
latency; a query that failed — error, rejected or lost — counts as +∞, so a mode that fails
0.2% of its queries has an infinite p99.9). Its interval comes from resampling *trials* with
replacement (``RESAMPLES`` times, seeded) and recomputing the pooled figure; the 2.5th and
97.5th percentiles of the resampled figures bound it. The resample is *paired*: one draw of
trial indices is used for every mode, so ratios between modes compare like with like. With
few trials (5 by default) such intervals are on the narrow side; they show how much the
figure moves between fault realisations, not a guarantee.

Percentiles are nearest-rank: the ⌈q/100 · n⌉-th smallest of n values (well defined with +∞).
A ratio of tail gaps is *undefined* (``None``) when its denominator is not finite or not > 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from parm.bench.histogram import LatencyHistogram

RESAMPLES = 2000
LEVEL = 0.95
PERCENTILES = {"p50_ms": 50.0, "p90_ms": 90.0, "p99_ms": 99.0, "p999_ms": 99.9}
_CHUNK = 100  # resamples evaluated at once (memory: CHUNK × distinct values)


@dataclass(frozen=True)
class TrialCounts:
    """One mode's latencies per trial on a shared value grid: ``counts[t, j]`` queries of
    trial t took ``values[j]`` ms (``values`` sorted; +∞ for failed queries)."""

    values: np.ndarray  # (V,)
    counts: np.ndarray  # (T, V) int64

    @property
    def trials(self) -> int:
        return int(self.counts.shape[0])

    @classmethod
    def from_latencies(cls, trials: Sequence[Sequence[float]]) -> TrialCounts:
        """From per-trial latency lists (ms; +∞ for a failed query)."""
        arrays = [np.asarray(t, dtype=np.float64) for t in trials]
        values = np.unique(np.concatenate(arrays)) if arrays else np.zeros(0)  # (V,)
        counts = np.zeros((len(arrays), values.size), dtype=np.int64)  # (T, V)
        for i, a in enumerate(arrays):
            np.add.at(counts[i], np.searchsorted(values, a), 1)
        return cls(values, counts)

    @classmethod
    def from_histograms(cls, histograms: Sequence[LatencyHistogram], failed: Sequence[int]) -> TrialCounts:
        """From per-trial histograms (one bucket layout) and each trial's failed-query count."""
        stacked = np.stack([h.counts for h in histograms])  # (T, buckets)
        used = np.flatnonzero(stacked.sum(axis=0))  # (V0,)
        h0 = histograms[0]
        mids = h0.min_ms * np.exp(used * h0._log_base) * (1 + h0.precision / 2)  # (V0,) bucket midpoints
        values = np.concatenate([mids, [math.inf]])  # (V0 + 1,)
        counts = np.concatenate([stacked[:, used], np.asarray(failed, dtype=np.int64)[:, None]], axis=1)
        return cls(values, counts)


def _percentiles(tc: TrialCounts, weights: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Nearest-rank percentiles of the pooled trials for each weight row: (R, T) -> (R, len(qs))."""
    out = np.empty((weights.shape[0], len(qs)))
    for lo in range(0, weights.shape[0], _CHUNK):
        cum = np.cumsum(weights[lo:lo + _CHUNK] @ tc.counts, axis=1)  # (r, T) @ (T, V) -> (r, V)
        total = cum[:, -1]  # (r,)
        for j, q in enumerate(qs):
            rank = np.maximum(1, np.ceil(np.round(q / 100.0 * total, 9)))  # (r,) rounded: 0.999 * 1000 is 999
            idx = np.minimum((cum < rank[:, None]).sum(axis=1), tc.values.size - 1)  # (r,)
            out[lo:lo + _CHUNK, j] = np.where(total > 0, tc.values[idx], np.nan)
    return out


def _bounds(samples: np.ndarray) -> list[float | None]:
    """[low, high] of the central LEVEL of ``samples`` (non-finite allowed; NaN dropped)."""
    kept = samples[~np.isnan(samples)]
    if kept.size == 0:
        return [None, None]
    tail = (1 - LEVEL) / 2 * 100
    low = float(np.percentile(kept, tail, method="lower"))
    high = float(np.percentile(kept, 100 - tail, method="higher"))
    return [low, high]


def gap_ratios(base: np.ndarray, ours: np.ndarray, *, limits: bool = False) -> np.ndarray:
    """(p99.9 − p50 of base) / (p99.9 − p50 of ours) per row of (R, 4) percentile arrays.

    NaN (undefined) where our gap is not finite or not > 0. With ``limits`` (for intervals) a
    resample where only our gap is infinite gives 0 and one where only the base's is gives +∞,
    so resamples in which failures reach p99.9 widen the interval instead of vanishing from it."""
    gap_b, gap_o = base[:, 3] - base[:, 0], ours[:, 3] - ours[:, 0]
    ok = np.isfinite(gap_o) & (gap_o > 0) & np.isfinite(gap_b)
    out = np.where(ok, gap_b / np.where(ok, gap_o, 1.0), np.nan)
    if limits:
        inf_o, inf_b = np.isinf(ours[:, 3]), np.isinf(base[:, 3])  # also when p50 is +inf too (inf - inf)
        out = np.where(inf_o & np.isfinite(gap_b), 0.0, out)
        out = np.where(inf_b & np.isfinite(gap_o) & (gap_o > 0), np.inf, out)
    return out


def median_ratios(base: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """p50 of ours / p50 of base per row (NaN where either is not finite)."""
    ok = np.isfinite(base[:, 0]) & np.isfinite(ours[:, 0]) & (base[:, 0] > 0)
    return np.where(ok, ours[:, 0] / np.where(ok, base[:, 0], 1.0), np.nan)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


class PairedBootstrap:
    """Point figures and 95% intervals for several modes measured over the same trials."""

    def __init__(self, modes: dict[str, TrialCounts], *, resamples: int = RESAMPLES, seed: int = 0) -> None:
        trials = {tc.trials for tc in modes.values()}
        if len(trials) > 1:
            raise ValueError(f"modes were measured over different numbers of trials: {sorted(trials)}")
        self.modes = modes
        self.trials = trials.pop() if trials else 0
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, self.trials, size=(resamples, self.trials)) if self.trials else np.zeros((0, 0), int)
        self.weights = np.stack([np.bincount(d, minlength=self.trials) for d in draws]) if self.trials else draws
        qs = list(PERCENTILES.values())
        ones = np.ones((1, self.trials))
        self.point = {m: _percentiles(tc, ones, qs)[0] for m, tc in modes.items()}  # mode -> (4,)
        self.resampled = {m: _percentiles(tc, self.weights.astype(np.float64), qs) for m, tc in modes.items()}

    def percentiles(self, mode: str) -> dict[str, object]:
        """``p50_ms`` … ``p999_ms`` (+∞ where failures reach that rank) and ``<name>_ci`` = [low, high]."""
        out: dict[str, object] = {}
        for j, name in enumerate(PERCENTILES):
            out[name] = float(self.point[mode][j])
            out[f"{name}_ci"] = _bounds(self.resampled[mode][:, j])
        return out

    def ratios(self, ours: str, base: str) -> dict[str, object]:
        """Gap ratio and median ratio of ``ours`` against ``base``, each with its interval."""
        gap = gap_ratios(self.point[base][None], self.point[ours][None])[0]
        med = median_ratios(self.point[base][None], self.point[ours][None])[0]
        return {
            f"gap_ratio_vs_{base}": _finite(gap) if not np.isnan(gap) else None,
            f"gap_ratio_vs_{base}_ci": _bounds(gap_ratios(self.resampled[base], self.resampled[ours], limits=True)),
            f"median_ratio_vs_{base}": _finite(med) if not np.isnan(med) else None,
            f"median_ratio_vs_{base}_ci": _bounds(median_ratios(self.resampled[base], self.resampled[ours])),
        }
