"""What recording served inputs costs: p50 latency over real HTTP with and without
``--record-inputs`` (``parm serve``), alternating, several rounds.

    python benchmarks/record_overhead.py --base runs/mnist-mlp/base --parity runs/mnist-mlp/k2-add \
        [--fraction 0.01] [--requests 2000] [--rate 100] [--rounds 3]

Each round starts ``parm serve --mode coded`` twice (without, then with recording), sends
``--requests`` single-query requests at ``--rate`` per second on one keep-alive connection (paced,
not open loop: the client waits for each answer, so it measures the server's latency at a load it
keeps up with), and records each request's latency. Prints p50/p99 per setting and round, the added
p50 (median over rounds), the bytes written by the recorder, the run-to-run spread of p50 (a fresh
server per run), and the recorder's own cost per request on the serving loop, timed in-process (what
recording adds to every request, whatever the noise between runs). Run it on an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _start(args: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "parm.cli", "serve", *args, "--host", "127.0.0.1", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready http://"):
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, int(line.strip().rsplit(":", 1)[1])


def _drive(port: int, requests: int, rate: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bodies = [json.dumps({"inputs": rng.standard_normal((1, 784)).round(4).tolist()}).encode() for _ in range(64)]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies = np.empty(requests)
    next_s = time.perf_counter()
    for i in range(requests):
        next_s += 1.0 / rate
        start = time.perf_counter()
        conn.request("POST", "/v1/predict", body=bodies[i % len(bodies)], headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        latencies[i] = (time.perf_counter() - start) * 1e3
        if response.status != 200:
            raise SystemExit(f"request {i} answered {response.status}")
        time.sleep(max(0.0, next_s - time.perf_counter()))
    conn.close()
    return latencies


def offer_cost_us(fraction: float, calls: int = 100_000) -> float:
    """The recorder's own cost on the serving loop: microseconds per ``offer`` of one query."""
    import torch

    from parm.serving.recorder import InputRecorder, RecordSpec

    with tempfile.TemporaryDirectory(prefix="parm-record-") as folder:
        recorder = InputRecorder(RecordSpec(Path(folder), fraction=fraction), seed=0)
        query = torch.randn(1, 1, 28, 28)
        start = time.perf_counter()
        for _ in range(calls):
            recorder.offer(query)
        elapsed = time.perf_counter() - start
        recorder.close()
    return elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--parity", required=True)
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    common = ["--base", args.base, "--parity", args.parity, "--mode", "coded", "--instances", "2"]
    p50: dict[bool, list[float]] = {False: [], True: []}
    written = 0
    for rnd in range(args.rounds):
        for record in (False, True):
            with tempfile.TemporaryDirectory(prefix="parm-record-") as folder:
                extra = ["--record-inputs", folder, "--record-fraction", str(args.fraction)] if record else []
                proc, port = _start(common + extra)
                try:
                    _drive(port, 200, args.rate, seed=99)  # warm-up, not measured
                    lat = _drive(port, args.requests, args.rate, seed=rnd)
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
                size = sum(f.stat().st_size for f in Path(folder).glob("inputs-*.npy"))
            written += size if record else 0
            p50[record].append(float(np.percentile(lat, 50)))
            print(f"round {rnd} record={'on ' if record else 'off'} p50 {p50[record][-1]:.3f} ms "
                  f"p99 {np.percentile(lat, 99):.3f} ms" + (f", {size} bytes recorded" if record else ""), flush=True)
    off, on = statistics.median(p50[False]), statistics.median(p50[True])
    print(f"p50 without recording {off:.3f} ms, with {args.fraction:.0%} recorded {on:.3f} ms: "
          f"{(on - off) / off * 100:+.1f}% (median over {args.rounds} rounds); {written} bytes recorded in all")
    spread = max(p50[False]) - min(p50[False])
    print(f"run-to-run spread of p50 without recording: {spread:.3f} ms ({spread / off * 100:.0f}% of it)")
    cost = offer_cost_us(args.fraction)
    print(f"the recorder's own cost on the serving loop: {cost:.2f} us per request "
          f"({cost / 1e3 / off * 100:.3f}% of the p50 without recording)")


if __name__ == "__main__":
    main()
