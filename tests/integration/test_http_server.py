"""parm.http over a real uvicorn on 127.0.0.1 (port 0) with a fake PredictService, driven by http.client.

The module's server runs in its own thread and event loop; readiness comes from ``on_ready`` (a
threading.Event), and teardown stops it through the ``stop`` event and checks the thread ends.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from parm.errors import BadQueryError, DeadlineExceededError, OverloadedError
from parm.http import HttpLimits, make_app, serve_http
from parm.serving.metrics import ServingMetrics
from parm.serving.types import Prediction, Source

SHAPE = (1, 4, 4)
SIZE = 16
HOST = "127.0.0.1"
MAX_BODY_BYTES = 64 * 1024
Q0 = [float(i) for i in range(SIZE)]
Q1 = [float(100 - i) for i in range(SIZE)]


@dataclass
class FakeService:
    """PredictService with knobs; scores are each query's first 3 values. Knobs are set from the test thread."""

    metrics: ServingMetrics
    query_shape: tuple[int, ...] = SHAPE
    fail_with: BaseException | None = None  # raised by the next predict, then cleared
    ok: bool = True
    hold: threading.Event | None = None  # when given, predict waits (off-loop) until it is set
    entered: threading.Event = field(default_factory=threading.Event)

    async def predict(self, queries: torch.Tensor, *, tenant: str | None = None) -> list[Prediction]:
        self.entered.set()
        if self.hold is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.hold.wait, 10.0)
        if self.fail_with is not None:
            exc, self.fail_with = self.fail_with, None
            raise exc
        scores = queries.reshape(queries.shape[0], -1)[:, :3]  # (N, size) -> (N, 3)
        self.metrics.queries.labels(source="original").inc(queries.shape[0])
        return [Prediction(scores=s, label=int(s.argmax()), source=Source.ORIGINAL, latency_ms=0.5) for s in scores]

    def health(self) -> dict:
        return {"ok": self.ok, "instances": []}


@dataclass
class Running:
    port: int
    service: FakeService
    metrics: ServingMetrics


@pytest.fixture(scope="module")
def server():
    yield from _serving(HttpLimits(max_body_bytes=MAX_BODY_BYTES, max_queries_per_request=64))


TIGHT = HttpLimits(max_body_bytes=MAX_BODY_BYTES, header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_s=1.0,
                   max_connections=8)


@pytest.fixture(scope="module")
def tight_server():
    """A server with 1 s header, body and keep-alive timeouts and at most 8 connections."""
    yield from _serving(TIGHT)


def _serving(limits: HttpLimits):
    metrics = ServingMetrics()
    service = FakeService(metrics)
    app = make_app(service, metrics, limits)
    ready = threading.Event()
    box: dict = {}

    def on_ready(host: str, port: int) -> None:
        box["addr"] = (host, port)
        ready.set()

    async def main() -> None:
        box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
        await serve_http(app, HOST, 0, on_ready=on_ready, stop=box["stop"], limits=limits)

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=run, name="http-server", daemon=True)
    thread.start()
    assert ready.wait(30), "server never became ready"
    assert "error" not in box, box.get("error")
    host, port = box["addr"]
    assert host == HOST and port > 0
    yield Running(port, service, metrics)
    box["loop"].call_soon_threadsafe(box["stop"].set)
    thread.join(10)
    assert not thread.is_alive(), "serve_http did not return after stop was set"
    assert "error" not in box, box.get("error")


def request(port: int, method: str, path: str, body=None, headers: dict | None = None):
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post(port: int, inputs) -> tuple[int, dict, dict]:
    status, headers, raw = request(port, "POST", "/v1/predict", json.dumps({"inputs": inputs}).encode(),
                                   {"Content-Type": "application/json"})
    return status, headers, json.loads(raw)


def b64(values) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def test_predict_lists(server) -> None:
    status, headers, doc = post(server.port, [Q0, np.asarray(Q1).reshape(SHAPE).tolist()])
    assert status == 200 and headers["content-type"] == "application/json"
    assert doc == {"outputs": [{"class": 2, "scores": Q0[:3], "source": "original", "latency_ms": 0.5},
                               {"class": 0, "scores": Q1[:3], "source": "original", "latency_ms": 0.5}]}


def test_predict_base64(server) -> None:
    status, _, doc = post(server.port, {"data": b64(Q1 + Q0), "shape": [2, *SHAPE]})
    assert status == 200 and [o["scores"] for o in doc["outputs"]] == [Q1[:3], Q0[:3]]


def test_keep_alive_connection_serves_many(server) -> None:
    conn = http.client.HTTPConnection(HOST, server.port, timeout=10)
    payload = json.dumps({"inputs": [Q0]}).encode()
    try:
        for _ in range(20):
            conn.request("POST", "/v1/predict", body=payload)
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["outputs"][0]["class"] == 2
    finally:
        conn.close()


@pytest.mark.parametrize("raw,status,words", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"inputs": [[1, 2, 3]]}', 422, "inputs[0] has 3 values; expected 16 (shape [1, 4, 4])"),
    (b'{"inputs": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, NaN]]}', 422, "non-finite"),
    (b'{"inputs": {"data": "AAA", "shape": [16]}}', 422, "not valid base64"),
    (b'{"inputs": []}', 422, "inputs is empty"),
])
def test_bad_queries(server, raw, status, words) -> None:
    got, _, body = request(server.port, "POST", "/v1/predict", raw)
    assert got == status
    error = json.loads(body)["error"]
    assert error["type"] == "bad_query" and words in error["message"]


@pytest.mark.parametrize("exc,status,type_", [
    (OverloadedError("queue full", limit="max_pending_queries", status=429), 429, "overloaded"),
    (OverloadedError("no healthy instance", limit="instances", status=503), 503, "overloaded"),
    (DeadlineExceededError("no answer in time", deadline_s=0.25), 504, "deadline_exceeded"),
    (BadQueryError("service says no", status=422), 422, "bad_query"),
    (RuntimeError("boom"), 500, "internal"),
])
def test_service_errors_map_to_statuses(server, exc, status, type_, caplog) -> None:
    server.service.fail_with = exc
    got, headers, doc = post(server.port, [Q0])
    assert got == status and doc["error"]["type"] == type_
    if type_ == "overloaded":
        assert headers["retry-after"] == "1"
    if status == 500:
        assert "boom" not in doc["error"]["message"]
    assert post(server.port, [Q0])[0] == 200  # still serving


def test_oversized_body_is_413(server) -> None:
    raw = json.dumps({"inputs": [Q0] * 1000}).encode()
    assert MAX_BODY_BYTES < len(raw) < 2 * MAX_BODY_BYTES
    status, _, body = request(server.port, "POST", "/v1/predict", raw)
    assert status == 413 and json.loads(body)["error"]["type"] == "body_too_large"


def test_oversized_chunked_body_is_413_while_reading(server) -> None:
    # No Content-Length, so the limit is found while reading. The whole request is sent at once and is only
    # a little over the limit, so the server has read all of it when it answers and closes (a close with
    # unread bytes would reset the connection and could lose the 413 before the client reads it).
    chunk = b" " * 8192
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(9)) + b"0\r\n\r\n"
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 413 and json.loads(resp.read())["error"]["type"] == "body_too_large"
    assert post(server.port, [Q0])[0] == 200


def test_routing_errors(server) -> None:
    assert request(server.port, "GET", "/v1/predict")[0] == 405
    assert request(server.port, "GET", "/nope")[0] == 404


def test_healthz(server) -> None:
    status, _, body = request(server.port, "GET", "/healthz")
    assert status == 200 and json.loads(body)["ok"] is True
    server.service.ok = False
    try:
        status, _, body = request(server.port, "GET", "/healthz")
        assert status == 503 and json.loads(body)["ok"] is False
    finally:
        server.service.ok = True


def test_metrics(server) -> None:
    post(server.port, [Q0])
    status, headers, body = request(server.port, "GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert "parm_queries" in text and 'parm_rejected_queries_total{reason="bad_query"}' in text


def test_client_disconnect_while_waiting(server) -> None:
    service = server.service
    service.entered.clear()
    service.hold = threading.Event()
    try:
        payload = json.dumps({"inputs": [Q0]}).encode()
        with socket.create_connection((HOST, server.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(payload), payload))
            assert service.entered.wait(10)
        service.hold.set()  # the answer is ready after the client left
    finally:
        service.hold.set()
        service.hold = None
    assert post(server.port, [Q1])[0] == 200


def test_serve_http_in_current_loop_and_stop() -> None:
    """serve_http shares the caller's loop: a task of it, a request from a thread, then stop."""
    metrics = ServingMetrics()
    app = make_app(FakeService(metrics), metrics)

    async def main() -> int:
        ready, stop, where = asyncio.Event(), asyncio.Event(), {}

        def on_ready(host: str, port: int) -> None:
            where["port"] = port
            ready.set()
        task = asyncio.create_task(serve_http(app, HOST, 0, on_ready=on_ready, stop=stop))
        await asyncio.wait_for(ready.wait(), 30)
        status = (await asyncio.to_thread(request, where["port"], "GET", "/healthz"))[0]
        stop.set()
        await asyncio.wait_for(task, 10)
        return status
    assert asyncio.run(main()) == 200


def test_port_in_use_raises_oserror() -> None:
    metrics = ServingMetrics()
    app = make_app(FakeService(metrics), metrics)
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            asyncio.run(asyncio.wait_for(serve_http(app, HOST, port), 30))


def test_on_ready_error_is_raised_after_shutdown() -> None:
    metrics = ServingMetrics()
    app = make_app(FakeService(metrics), metrics)

    def on_ready(host: str, port: int) -> None:
        raise ValueError(f"cannot publish {host}:{port}")
    with pytest.raises(ValueError, match="cannot publish 127.0.0.1:"):
        asyncio.run(asyncio.wait_for(serve_http(app, HOST, 0, on_ready=on_ready), 30))


# ---- connections that never finish ----------------------------------------------------------------
def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` (reads EOF, possibly after a response) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_half_sent_headers_are_dropped_after_the_header_timeout(tight_server) -> None:
    """slowloris: a request line and one header, then nothing. Closed after header_timeout_s (1 s)."""
    socks = [socket.create_connection((HOST, tight_server.port)) for _ in range(5)]
    try:
        for sock in socks:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
        assert all(_closed_within(sock, 4.0) for sock in socks)
    finally:
        for sock in socks:
            sock.close()
    assert post(tight_server.port, [Q0])[0] == 200


def test_a_connection_that_sends_nothing_is_dropped(tight_server) -> None:
    with socket.create_connection((HOST, tight_server.port)) as sock:
        assert _closed_within(sock, 4.0)


def test_a_stalled_body_gets_408_and_the_connection_closes(tight_server) -> None:
    with socket.create_connection((HOST, tight_server.port)) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"inputs\": [")
        sock.settimeout(5.0)
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and b"connection: close" in reply.lower()
        assert _closed_within(sock, 4.0)


def test_an_idle_keep_alive_connection_is_closed(tight_server) -> None:
    conn = http.client.HTTPConnection(HOST, tight_server.port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        assert conn.getresponse().read()
        assert _closed_within(conn.sock, 4.0)
    finally:
        conn.close()


def test_both_transfer_encoding_and_content_length_is_refused_and_closed(tight_server) -> None:
    """Request smuggling: a request with both framings is a 400 and the connection is closed."""
    with socket.create_connection((HOST, tight_server.port)) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        sock.settimeout(5.0)
        reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
        assert _closed_within(sock, 4.0)


def test_connections_past_the_limit_get_503_and_the_server_recovers(tight_server) -> None:
    idle = [socket.create_connection((HOST, tight_server.port)) for _ in range(TIGHT.max_connections)]
    try:
        status, _, _ = request(tight_server.port, "GET", "/healthz")
        assert status == 503
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while request(tight_server.port, "GET", "/healthz")[0] != 200:
        assert time.monotonic() < deadline, "the server did not recover after the idle connections closed"
        time.sleep(0.05)


def test_many_requests_on_one_keep_alive_connection_never_trip_the_header_limit(tight_server) -> None:
    """The header-size limit counts each request's own headers, not the connection's history."""
    conn = http.client.HTTPConnection(HOST, tight_server.port, timeout=10)
    try:
        payload = json.dumps({"inputs": [Q0] * 50}).encode()  # ~5 KB a request, 200 KB over the connection
        for _ in range(40):
            conn.request("POST", "/v1/predict", body=payload, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200, response.read()[:200]
            response.read()
    finally:
        conn.close()


def test_a_client_that_sends_its_whole_body_first_still_reads_the_413(server) -> None:
    """http.client writes the whole body before reading: the server drains it and answers 413,
    instead of closing mid-body (which would reset the connection under the client)."""
    payload = json.dumps({"inputs": [Q0] * 40_000}).encode()  # ~3 MB, far over MAX_BODY_BYTES
    for headers in ({"Content-Type": "application/json"}, {"Content-Type": "application/json",
                                                          "Transfer-Encoding": "chunked"}):
        conn = http.client.HTTPConnection(HOST, server.port, timeout=30)
        try:
            body = payload if "Transfer-Encoding" not in headers else iter([payload[i:i + 65536]
                                                                            for i in range(0, len(payload), 65536)])
            conn.request("POST", "/v1/predict", body=body, headers=headers, encode_chunked="Transfer-Encoding" in headers)
            response = conn.getresponse()
            assert response.status == 413 and json.loads(response.read())["error"]["type"] == "body_too_large"
        finally:
            conn.close()
