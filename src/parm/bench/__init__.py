"""Benchmarks: open-loop load generation, records, statistics, running modes side by side."""

from parm.bench.loadgen import QueryResult, poisson_arrivals_s, run_open_loop
from parm.bench.runner import LoadSpec, format_table, gap_ratio, run_mode, run_modes
from parm.bench.stats import latency_summary, summarize

__all__ = [
    "LoadSpec",
    "QueryResult",
    "format_table",
    "gap_ratio",
    "latency_summary",
    "poisson_arrivals_s",
    "run_mode",
    "run_modes",
    "run_open_loop",
    "summarize",
]
