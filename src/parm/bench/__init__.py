"""Benchmarks: open-loop load generation, records, statistics, running modes side by side."""

from parm.bench.loadgen import QueryResult, poisson_arrivals_s, run_open_loop
from parm.bench.runner import LoadSpec, run_mode
from parm.bench.stats import latency_summary, summarize

__all__ = [
    "LoadSpec",
    "QueryResult",
    "latency_summary",
    "poisson_arrivals_s",
    "run_mode",
    "run_open_loop",
    "summarize",
]
