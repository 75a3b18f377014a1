"""Do big request bodies stall everyone else? Small-request latency of `parm serve` while other
clients post large bodies.

    python benchmarks/http_parse_stall.py --base runs/mnist-mlp/base [--seconds 10] [--big-clients 0,1,4] \
        [--request-window N]

Needs `wrk`. Starts `parm serve --mode none` (2 instances, no emulated time, 8 MiB body limit) and,
for each count of big clients, runs that many processes each posting, in a loop, a ~7 MB body of
JSON number lists (the largest the body limit allows) while wrk sends one-query requests from 4
connections; prints the small requests' answers/s, p50 and p99, and what the big clients got back
(status counts and their mean round trip). Then the same with big clients sending the same inputs in
the base64 form (1,000 queries per request). ``--request-window`` is passed to `parm serve` (default:
its own, 2 × batch size × instances; 100000 lets a whole request in at once, as before that option).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import multiprocessing as mp
import signal
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from http_throughput import _wrk  # noqa: E402


def _big_client(port: int, body: bytes, stop_at: float, out: mp.Queue) -> None:
    statuses: Counter[int] = Counter()
    took = []
    while time.monotonic() < stop_at:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start = time.monotonic()
        try:
            conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            statuses[response.status] += 1
        except OSError:
            statuses[0] += 1
        finally:
            conn.close()
        took.append(time.monotonic() - start)
    out.put((dict(statuses), sum(took) / max(len(took), 1)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--big-clients", default="0,1,4")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--request-window", type=int, default=None, help="parm serve --request-window")
    args = parser.parse_args(argv)
    import subprocess
    import tempfile

    import numpy as np

    from parm.checkpoint import load_record
    from parm.data import load_dataset

    record = load_record(args.base)
    test = load_dataset(record.dataset, "test", data_root=args.data_root)
    images = test.prepared_for(record.in_shape, record.mean, record.std, model=str(args.base)).float_images()
    one = json.dumps({"inputs": [images[0].flatten().tolist()]})
    rows = [[round(v, 6) for v in img.flatten().tolist()] for img in images[:1024]]
    big_json = json.dumps({"inputs": rows}).encode()
    while len(big_json) > 8 * 1024 * 1024 - 1024:  # the largest body the default limit takes
        rows = rows[: int(len(rows) * 0.95)]
        big_json = json.dumps({"inputs": rows}).encode()
    data = np.ascontiguousarray(images[:1000].numpy(), dtype="<f4")
    big_b64 = json.dumps({"inputs": {"data": base64.b64encode(data.tobytes()).decode(),
                                     "shape": [1000, *record.in_shape]}}).encode()
    proc = subprocess.Popen([sys.executable, "-m", "parm.cli", "serve", "--base", str(args.base), "--mode", "none",
                             "--instances", "2", "--emulated-ms", "0", "--host", "127.0.0.1", "--port", "0",
                             "--max-pending", "100000",
                             *([] if args.request_window is None else ["--request-window", str(args.request_window)])],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("ready http://"):
        proc.kill()
        raise SystemExit(f"parm serve did not start: {line!r}")
    port = int(line.strip().rsplit(":", 1)[1])
    print(f"big bodies: JSON lists {len(big_json) / 1e6:.1f} MB ({len(rows)} queries); base64 {len(big_b64) / 1e6:.1f} MB "
          "(1000 queries)")
    print(f"{'big clients':>11s} {'form':>7s} {'small answers/s':>15s} {'p50 ms':>8s} {'p99 ms':>8s}  big clients got "
          "(status: count), mean round trip")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "post.lua"
            script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                              f"wrk.body = {json.dumps(one)}\n")
            _wrk(port, script, 4, 2.0)  # warm-up
            for n in [int(c) for c in args.big_clients.split(",")]:
                for form, body in (("json", big_json), ("base64", big_b64)) if n else (("-", b""),):
                    queue: mp.Queue = mp.Queue()
                    stop_at = time.monotonic() + args.seconds + 1.0
                    clients = [mp.Process(target=_big_client, args=(port, body, stop_at, queue)) for _ in range(n)]
                    for c in clients:
                        c.start()
                    time.sleep(0.5 if n else 0.0)
                    small = _wrk(port, script, 4, args.seconds)
                    results = [queue.get(timeout=120) for _ in clients]
                    for c in clients:
                        c.join()
                    got: Counter[int] = Counter()
                    for statuses, _ in results:
                        got.update(statuses)
                    mean_s = sum(t for _, t in results) / max(len(results), 1)
                    print(f"{n:11d} {form:>7s} {small['answers_s']:15.0f} {small['p50_ms']:8.2f} {small['p99_ms']:8.2f}  "
                          + (f"{dict(got)}, {mean_s * 1e3:.0f} ms" if n else "-"), flush=True)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
