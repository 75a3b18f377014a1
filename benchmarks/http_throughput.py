"""End-to-end HTTP throughput and latency of `parm serve`, driven by wrk (a real HTTP load generator).

    python benchmarks/http_throughput.py --base runs/mnist-mlp/base --parity runs/mnist-mlp/k2-add \\
        [--modes none,coded] [--batch-sizes 1,16] [--batch-policies wait,idle] [--connections 32] [--seconds 8] \
        [--instances 2] [--repeats 3]

Needs `wrk` on the PATH (Debian/Ubuntu: apt-get install wrk). For each mode and batch size it starts
`parm serve` on 127.0.0.1 (no emulated accelerator time: `--emulated-ms 0`, so the model is the MNIST
MLP's ~0.1 ms and the rest is serving overhead), sends one-query JSON requests of a real test image
from `--connections` keep-alive connections for `--seconds` (after a 2 s warm-up), and prints
answers/s, p50/p99 latency and non-2xx responses; then p50 at low load (1 connection) of the same
server. Batch policy ``wait`` forms a partial batch after ``--batch-wait-ms`` (1 ms); ``idle`` forms it at
once when a data instance is idle (dynamic batching, ``parm serve --batch-policy idle``). Each
configuration runs ``--repeats`` times, each with a fresh server; the table gives the median and the
range (min–max) over them. Everything runs on this machine, so wrk's own CPU is part of what the cores
do: say so when you quote it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _start(args: argparse.Namespace, mode: str, batch: int, policy: str) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "parm.cli", "serve", "--base", str(args.base), "--mode", mode, "--instances",
           str(args.instances), "--batch-size", str(batch), "--batch-policy", policy, "--emulated-ms", "0",
           "--host", "127.0.0.1",
           "--port", "0", "--max-pending", "100000"]
    if mode in ("coded", "coded-hedge"):
        cmd += ["--parity", str(args.parity)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("ready http://"):
        proc.kill()
        raise SystemExit(f"parm serve --mode {mode} did not start: {line!r}")
    return proc, int(line.strip().rsplit(":", 1)[1])


def _wrk(port: int, script: Path, connections: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script),
                          f"http://127.0.0.1:{port}/v1/predict"], capture_output=True, text=True, check=True).stdout
    result = {"answers_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        value, unit = re.search(rf"\s{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        result[f"p{pct}_ms"] = float(value) * _UNITS[unit]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    result["non_2xx"] = float(bad.group(1)) if bad else 0.0
    result["socket_errors"] = errors.group(1) if errors else "none"  # type: ignore[assignment]
    return result


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _spread(runs: list[dict[str, float]], key: str, digits: int) -> str:
    """median [min, max] of ``key`` over the runs."""
    values = sorted(r[key] for r in runs)
    return f"{statistics.median(values):.{digits}f} [{values[0]:.{digits}f}, {values[-1]:.{digits}f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--parity", type=Path, default=None, help="needed for modes coded and coded-hedge")
    parser.add_argument("--modes", default="none,coded")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--batch-policies", default="wait,idle", help="wait and/or idle (see above)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration, each a fresh server")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not on the PATH (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    from parm.checkpoint import load_record
    from parm.data import load_dataset

    record = load_record(args.base)
    test = load_dataset(record.dataset, "test", data_root=args.data_root)
    query = test.prepared_for(record.in_shape, record.mean, record.std, model=str(args.base)).float_images()[0]
    body = json.dumps({"inputs": [query.flatten().tolist()]})
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                          f"wrk.body = {json.dumps(body)}\n")
        print(f"{args.repeats} runs per row: median [min, max]", flush=True)
        print(f"{'mode':12s} {'batch':>5s} {'policy':>6s} {'answers/s':>20s} {'p50 ms':>20s} {'p99 ms':>20s} {'non-2xx':>8s} "
              f"{'p50 ms at 1 conn':>20s}  socket errors", flush=True)
        rows = [(mode, batch, policy) for mode in _items(args.modes) for batch in map(int, _items(args.batch_sizes))
                for policy in _items(args.batch_policies)]
        for mode, batch, policy in rows:
            if batch == 1 and policy == "idle" and "wait" in _items(args.batch_policies):
                continue  # a batch of one is full at once: both policies are the same server
            runs = []
            for _ in range(args.repeats):
                proc, port = _start(args, mode, batch, policy)
                try:
                    _wrk(port, script, args.connections, 2.0)  # warm-up
                    loaded = _wrk(port, script, args.connections, args.seconds)
                    loaded["light_p50_ms"] = _wrk(port, script, 1, min(args.seconds, 5.0))["p50_ms"]
                    runs.append(loaded)
                finally:
                    proc.send_signal(signal.SIGINT)
                    proc.wait(timeout=60)

            errors = {str(r["socket_errors"]) for r in runs}
            print(f"{mode:12s} {batch:5d} {policy:>6s} {_spread(runs, 'answers_s', 0):>20s} {_spread(runs, 'p50_ms', 2):>20s} "
                  f"{_spread(runs, 'p99_ms', 2):>20s} {sum(r['non_2xx'] for r in runs):8.0f} "
                  f"{_spread(runs, 'light_p50_ms', 2):>20s}  {', '.join(sorted(errors))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
