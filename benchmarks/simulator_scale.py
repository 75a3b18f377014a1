"""How the cluster simulator scales: wall time per simulated query and peak memory, for the
paper's cluster and a 1,000-instance one.

    python benchmarks/simulator_scale.py [--queries 20000 100000] [--instances 12 1000]

Memory must not grow with the number of queries (latencies stream into a fixed-size histogram):
compare peak RSS between query counts. Each configuration runs in a fresh process so that its
peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(instances: int, queries: int) -> dict:
    from parm.bench.simulate import SIM_QUERY_SHAPE, ServiceModel, simulate
    from parm.bench.stats import summarize
    from parm.faults import parse_fault_spec
    from parm.serving import ServingConfig, instance_roles

    rate = 270.0 * instances / 12  # the paper's moderate load per instance
    config = ServingConfig(SIM_QUERY_SHAPE, mode="coded", k=2, stall_timeout_ms=60_000, deadline_ms=60_000,
                           max_pending_queries=10**8)
    started = time.perf_counter()
    result = simulate(config, instance_roles("coded", instances, 2), ServiceModel(median_ms=25.0, sigma=0.15),
                      queries=queries, rate_qps=rate, faults=parse_fault_spec("slow:rate_hz=0.1,duration_s=1,factor=20"))
    wall = time.perf_counter() - started
    return {"instances": instances, "queries": queries, "wall_s": wall, "us_per_query": wall / queries * 1e6,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "p999_ms": summarize([result])["p999_ms"], "lost": result.lost}


def main() -> None:
    parser = argparse.ArgumentParser(description="simulator scaling")
    parser.add_argument("--queries", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--instances", type=int, nargs="+", default=[12, 1000])
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(*args.child)))
        return
    print(f"{'data inst':>9s} {'queries':>9s} {'wall s':>8s} {'us/query':>9s} {'peak RSS MB':>12s} {'lost':>5s}")
    for instances in args.instances:
        for queries in args.queries:
            out = subprocess.run([sys.executable, __file__, "--child", str(instances), str(queries)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['instances']:9d} {r['queries']:9d} {r['wall_s']:8.1f} {r['us_per_query']:9.0f} "
                  f"{r['peak_rss_mb']:12.0f} {r['lost']:5d}", flush=True)


if __name__ == "__main__":
    main()
