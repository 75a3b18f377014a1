"""Benchmarks: the open-loop load driver and its sinks, statistics, running modes side by side."""

from parm.bench.loadgen import (
    HistogramSink,
    QueryResult,
    RecordSink,
    Sink,
    drive_open_loop,
    poisson_arrivals_s,
    poisson_gaps_s,
    run_open_loop,
)
from parm.bench.runner import LoadSpec, run_mode
from parm.bench.stats import latency_summary, summarize

__all__ = [
    "HistogramSink",
    "LoadSpec",
    "QueryResult",
    "RecordSink",
    "Sink",
    "drive_open_loop",
    "latency_summary",
    "poisson_arrivals_s",
    "poisson_gaps_s",
    "run_mode",
    "run_open_loop",
    "summarize",
]
