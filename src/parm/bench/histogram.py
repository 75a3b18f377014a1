"""An HDR-style latency histogram: log-spaced buckets with bounded relative error, O(1) memory per run.

Values (milliseconds) land in buckets whose width is ``precision`` × their value, so every
percentile is within that relative error of the exact one, however many values are recorded.
Histograms of different trials merge by adding counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from parm.errors import ConfigError


class LatencyHistogram:
    """Counts of latencies in log buckets from ``min_ms`` to ``max_ms`` (values outside are clamped)."""

    def __init__(self, min_ms: float = 0.001, max_ms: float = 3_600_000.0, precision: float = 0.001) -> None:
        if not 0 < min_ms < max_ms or not 0 < precision < 0.5:
            raise ConfigError(f"need 0 < min_ms < max_ms and 0 < precision < 0.5; got {min_ms}, {max_ms}, {precision}",
                              field="precision", value=precision)
        self.min_ms, self.max_ms, self.precision = min_ms, max_ms, precision
        self._log_base = math.log1p(precision)
        self.counts = np.zeros(self._index(max_ms) + 1, dtype=np.int64)
        self.total = 0
        self.sum_ms = 0.0
        self.max_seen_ms = 0.0

    def _index(self, value_ms: float) -> int:
        return int(math.log(max(value_ms, self.min_ms) / self.min_ms) / self._log_base)

    def record(self, value_ms: float) -> None:
        self.counts[min(self._index(value_ms), len(self.counts) - 1)] += 1
        self.total += 1
        self.sum_ms += value_ms
        self.max_seen_ms = max(self.max_seen_ms, value_ms)

    def record_many(self, values_ms: Iterable[float]) -> None:
        values = np.asarray(list(values_ms) if not isinstance(values_ms, np.ndarray) else values_ms, dtype=np.float64)
        if values.size == 0:
            return
        idx = (np.log(np.maximum(values, self.min_ms) / self.min_ms) / self._log_base).astype(np.int64)
        np.add.at(self.counts, np.minimum(idx, len(self.counts) - 1), 1)
        self.total += int(values.size)
        self.sum_ms += float(values.sum())
        self.max_seen_ms = max(self.max_seen_ms, float(values.max()))

    def merge(self, other: LatencyHistogram) -> None:
        if (other.min_ms, other.max_ms, other.precision) != (self.min_ms, self.max_ms, self.precision):
            raise ConfigError("histograms with different bucket layouts cannot be merged", field="precision",
                              value=other.precision)
        self.counts += other.counts
        self.total += other.total
        self.sum_ms += other.sum_ms
        self.max_seen_ms = max(self.max_seen_ms, other.max_seen_ms)

    def percentile(self, q: float, failed: int = 0) -> float:
        """The q-th percentile (0..100): the midpoint of the bucket holding that rank, among the
        recorded values and ``failed`` more values of +∞."""
        n = self.total + failed
        if n == 0:
            return float("nan")
        rank = max(1, math.ceil(round(q / 100.0 * n, 9)))  # rounded: 0.999 * 1000 is 999
        if rank > self.total:
            return math.inf
        i = int(np.searchsorted(np.cumsum(self.counts), rank))
        low = self.min_ms * math.exp(i * self._log_base)
        return min(low * (1 + self.precision / 2), self.max_seen_ms)

    def summary(self, failed: int = 0) -> dict[str, float]:
        """Percentiles over the recorded values plus ``failed`` values of +∞ (nearest rank);
        mean and max over the recorded values."""
        return {**{name: self.percentile(q, failed) for name, q in
                   (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99), ("p999_ms", 99.9))},
                "mean_ms": self.sum_ms / self.total if self.total else float("nan"),
                "max_ms": self.max_seen_ms if self.total else float("nan")}
