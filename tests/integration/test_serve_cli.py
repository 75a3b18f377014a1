"""`parm serve` as a real process over real HTTP: predictions, bad input, overload, a crash
mid-traffic, metrics, and a clean Ctrl-C with no orphan processes."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from processes import alive, descendants

SHAPE = (1, 28, 28)


def _start_server(args: list[str], timeout_s: float = 120) -> tuple[subprocess.Popen, int]:
    """`parm serve ARGS --host 127.0.0.1 --port 0`, once it prints its ready line: (process, port)."""
    proc = subprocess.Popen([sys.executable, "-m", "parm.cli", "serve", *args, "--host", "127.0.0.1", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("ready ") or proc.poll() is not None:
            break
    if not line.startswith("ready http://127.0.0.1:"):
        proc.kill()
        pytest.fail(f"server did not start: {line!r} {proc.stderr.read()[-3000:]}")
    return proc, int(line.strip().rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def server(tiny_checkpoints: tuple[Path, Path]):
    base, parity = tiny_checkpoints
    proc, port = _start_server(["--base", str(base), "--parity", str(parity), "--instances", "2", "--mode", "coded",
                                "--max-pending", "64", "--faults", "crash:instance=1,at_s=4",
                                "--tenant-header", "x-api-key"])
    yield proc, port
    if proc.poll() is None:
        proc.kill()


def _request(port: int, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _predict(port: int, payload) -> tuple[int, dict]:
    status, _, body = _request(port, "POST", "/v1/predict", json.dumps(payload).encode())
    return status, json.loads(body)


def test_predict_lists_and_base64(server) -> None:
    _, port = server
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, *SHAPE)).astype(np.float32)
    status, out = _predict(port, {"inputs": x.reshape(3, -1).tolist()})
    assert status == 200 and len(out["outputs"]) == 3
    first = out["outputs"][0]
    assert set(first) == {"class", "scores", "source", "latency_ms"} and len(first["scores"]) == 10
    assert first["source"] in ("original", "reconstructed", "retried") and first["class"] == int(np.argmax(first["scores"]))
    status, out64 = _predict(port, {"inputs": {"data": base64.b64encode(x.tobytes()).decode(), "shape": [3, *SHAPE]}})
    assert status == 200 and len(out64["outputs"]) == 3
    for a, b in zip(out64["outputs"], out["outputs"]):  # reconstructions are approximate: compare originals
        if a["source"] == b["source"] == "original":
            np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "JSON"),
    (json.dumps({"inputs": [[0.0] * 783]}).encode(), 422, "783"),
    (json.dumps({"inputs": []}).encode(), 422, "empty"),
    (b'{"inputs": [[NaN' + b', 0.0' * 783 + b']]}', 422, "finite"),
    (json.dumps({"queries": [[0.0] * 784]}).encode(), 422, "inputs"),
])
def test_bad_input_is_refused_and_server_keeps_serving(server, body: bytes, status: int, words: str) -> None:
    _, port = server
    got, _, raw = _request(port, "POST", "/v1/predict", body)
    assert got == status, raw
    assert words.lower() in json.loads(raw)["error"]["message"].lower()
    assert _predict(port, {"inputs": [[0.0] * 784]})[0] == 200


def test_tenants_are_served_and_a_repeated_tenant_header_is_refused(server) -> None:
    """--tenant-header x-api-key: requests of two tenants at once are answered (their coding groups
    are kept apart: tests/unit/test_input_isolation.py); a request naming two tenants is a 400."""
    import concurrent.futures

    _, port = server
    body = json.dumps({"inputs": np.zeros((2, 784)).tolist()}).encode()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda t: _request(port, "POST", "/v1/predict", body, {"X-Api-Key": t})[0],
                                 ["alice", "bob"] * 10))
    assert statuses == [200] * 20
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/predict")
        for name, value in (("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                            ("X-Api-Key", "alice"), ("X-Api-Key", "bob")):
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        assert response.status == 400 and json.loads(response.read())["error"]["type"] == "bad_tenant"
    finally:
        conn.close()


def test_a_request_larger_than_max_pending_is_413_not_retry_later(server) -> None:
    _, port = server
    status, out = _predict(port, {"inputs": np.zeros((100, 784)).tolist()})  # more than --max-pending 64
    assert status == 413 and "max_pending_queries=64" in out["error"]["message"]
    assert _predict(port, {"inputs": np.zeros((10, 784)).tolist()})[0] == 200


def test_idle_batching_and_a_request_window_answer_every_query_its_own(tiny_checkpoints) -> None:
    """--batch-policy idle with a 2 s batch wait: a lone query is answered long before its batch of 8
    could fill or time out, and concurrent requests (batched together) all get their own answers; with
    --request-window 8, a 300-query request sent beside them is answered whole and in order."""
    import concurrent.futures

    base, parity = tiny_checkpoints
    proc, port = _start_server(["--base", str(base), "--parity", str(parity), "--instances", "2", "--mode", "coded",
                                "--batch-size", "8", "--batch-policy", "idle", "--batch-wait-ms", "2000",
                                "--request-window", "8"])
    try:
        rng = np.random.default_rng(3)
        x = rng.standard_normal((24, *SHAPE)).astype(np.float32)
        for i in range(3):
            t0 = time.monotonic()
            status, out = _predict(port, {"inputs": [x[i].reshape(-1).tolist()]})
            assert status == 200 and out["outputs"][0]["latency_ms"] < 1000 and time.monotonic() - t0 < 1.5
        big = rng.standard_normal((300, *SHAPE)).astype(np.float32)
        big_body = {"inputs": {"data": base64.b64encode(big.tobytes()).decode(), "shape": [300, *SHAPE]}}
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            big_future = pool.submit(_predict, port, big_body)
            results = list(pool.map(lambda q: _predict(port, {"inputs": [q.reshape(-1).tolist()]}), x))
            big_status, big_out = big_future.result()
        alone = [_predict(port, {"inputs": [q.reshape(-1).tolist()]}) for q in x[:4]]
        assert big_status == 200 and len(big_out["outputs"]) == 300
        _, first_two = _predict(port, {"inputs": big[:2].reshape(2, -1).tolist()})
        for a, b in zip(big_out["outputs"][:2], first_two["outputs"]):  # in the request's order
            if a["source"] == b["source"] == "original":
                np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-4, atol=1e-4)
        assert all(status == 200 and len(out["outputs"]) == 1 for status, out in results + alone)
        for (_, together), (_, single) in zip(results, alone):  # each answer is its own query's, not a neighbour's
            a, b = together["outputs"][0], single["outputs"][0]
            if a["source"] == b["source"] == "original":
                np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-4, atol=1e-4)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def test_crash_mid_traffic_loses_nothing_then_metrics_and_health(server) -> None:
    _, port = server
    rng = np.random.default_rng(1)
    sources: dict[str, int] = {}
    start = time.monotonic()
    while time.monotonic() - start < 6.0:  # the crash fault fires at 4 s after start
        status, out = _predict(port, {"inputs": rng.standard_normal((2, 784)).astype(np.float32).tolist()})
        assert status == 200, out
        for o in out["outputs"]:
            sources[o["source"]] = sources.get(o["source"], 0) + 1
    status, _, health = _request(port, "GET", "/healthz")
    assert status == 200 and json.loads(health)["ok"] is True
    status, headers, metrics = _request(port, "GET", "/metrics")
    text = metrics.decode()
    assert status == 200 and "parm_queries_total" in text and "parm_instance_healthy" in text
    assert "parm_query_latency_seconds_bucket" in text and "parm_queue_depth" in text
    assert sum(sources.values()) > 50


def test_ctrl_c_stops_cleanly_without_orphans(server) -> None:
    proc, port = server
    family = descendants(proc.pid)
    assert len(family) >= 3  # forkserver and the instances
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert "stopped" in proc.stdout.read()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in family):
        time.sleep(0.1)
    assert not [p for p in family if alive(p)]


@pytest.mark.ray
def test_serve_on_ray_same_http_api_then_ctrl_c_removes_everything(tiny_checkpoints: tuple[Path, Path]) -> None:
    """`parm serve --backend ray` starts its own local Ray cluster: the same HTTP API answers; Ctrl-C
    deletes the deployments, stops the cluster it started and leaves no process behind."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install \"parm-serving[ray]\"")
    base, parity = tiny_checkpoints
    proc, port = _start_server(["--backend", "ray", "--base", str(base), "--parity", str(parity), "--instances", "2"],
                               timeout_s=180)
    try:
        x = np.random.default_rng(0).standard_normal((4, 784)).astype(np.float32)
        status, out = _predict(port, {"inputs": x.tolist()})
        assert status == 200 and len(out["outputs"]) == 4, out
        assert _request(port, "POST", "/v1/predict", b"{not json")[0] == 400
        status, _, health = _request(port, "GET", "/healthz")
        assert status == 200 and [i["role"] for i in json.loads(health)["instances"]] == ["data", "data", "parity"]
        family = descendants(proc.pid)
        assert any("raylet" in _cmdline(p) for p in family), "no local Ray cluster under the server"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-3000:]
        assert "stopped" in proc.stdout.read()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(alive(p) for p in family):
            time.sleep(0.2)
        assert not [(p, _cmdline(p)) for p in family if alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.ray
def test_serve_on_an_unreachable_ray_cluster_says_what_to_do(tiny_checkpoints: tuple[Path, Path]) -> None:
    pytest.importorskip("ray", reason="Ray is not installed: pip install \"parm-serving[ray]\"")
    base, parity = tiny_checkpoints
    proc = subprocess.run([sys.executable, "-m", "parm.cli", "serve", "--backend", "ray", "--ray-address", "127.0.0.1:1",
                           "--base", str(base), "--parity", str(parity), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no Ray cluster answers at '127.0.0.1:1'" in proc.stderr and "ray start --head" in proc.stderr
