"""Hostile HTTP against a real `parm serve` (mode coded, real instance processes): malformed
framing, request smuggling, chunked bombs, huge nesting, huge and non-finite numbers, bad
base64, slowloris. Every answer is a 4xx (or, for a well-formed query, a 200) with a JSON body;
the server stays up and healthy, and its log holds no traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HOST = "127.0.0.1"
SIZE = 784


def _http(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", "Connection: close"]
    heads = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
    lines += [f"{k}: {v}" for k, v in heads.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _predict(body: bytes | str, **headers: str) -> bytes:
    return _http("POST", "/v1/predict", body.encode() if isinstance(body, str) else body, headers)


def _flat(value: str) -> str:
    return "[" + ",".join([value] * SIZE) + "]"


def _raw(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode() + body


PIXELS = _flat("0.5")
HOSTILE: dict[str, tuple[bytes, set[int]]] = {
    # malformed JSON and queries
    "empty body": (_predict(""), {400}),
    "truncated JSON": (_predict('{"inputs": [[1, 2'), {400}),
    "not an object": (_predict("[1, 2, 3]"), {422}),
    "no inputs key": (_predict('{"x": 1}'), {422}),
    "inputs is a string": (_predict('{"inputs": "abc"}'), {422}),
    "inputs empty": (_predict('{"inputs": []}'), {422}),
    "wrong query size": (_predict('{"inputs": [[1, 2, 3]]}'), {422}),
    "ragged queries": (_predict('{"inputs": [' + PIXELS + ', [1, 2]]}'), {422}),
    "strings as numbers": (_predict('{"inputs": [' + _flat('"a"') + "]}"), {422}),
    "booleans as numbers": (_predict('{"inputs": [' + _flat("true") + "]}"), {200, 422}),
    "nulls as numbers": (_predict('{"inputs": [' + _flat("null") + "]}"), {422}),
    "NaN literal": (_predict('{"inputs": [' + _flat("NaN") + "]}"), {422}),
    "Infinity literal": (_predict('{"inputs": [' + _flat("Infinity") + "]}"), {422}),
    "1e400 (overflows to inf)": (_predict('{"inputs": [' + _flat("1e400") + "]}"), {422}),
    "3e38 everywhere": (_predict('{"inputs": [' + _flat("3e38") + "]}"), {422}),
    "-3e38 everywhere": (_predict('{"inputs": [' + _flat("-3e38") + "]}"), {422}),
    "one 3e38 among normal values": (_predict('{"inputs": [[3e38' + ",0.5" * (SIZE - 1) + "]]}"), {200, 422}),
    "unnormalised pixels (0..255)": (_predict('{"inputs": [' + _flat("255") + "]}"), {200, 422}),
    "all 10.0": (_predict('{"inputs": [' + _flat("10.0") + "]}"), {200, 422}),
    "nesting 100,000 deep": (_predict("[" * 100_000 + "]" * 100_000), {400, 413, 422}),
    "nested inputs 5,000 deep": (_predict('{"inputs": ' + "[" * 5000 + "]" * 5000 + "}"), {400, 413, 422}),
    "too many queries": (_predict('{"inputs": [' + ",".join([PIXELS] * 1100) + "]}"), {413, 422}),
    "body over the limit": (_predict(b'{"inputs": [' + b"0," * 40_000 + b"0]}"), {413}),
    "non-UTF-8 body": (_predict(b'{"inputs": "\xff\xfe"}'), {400}),
    "invalid base64": (_predict('{"inputs": {"data": "***", "shape": [1, 1, 28, 28]}}'), {422}),
    "base64 of the wrong length": (_predict('{"inputs": {"data": "AAAA", "shape": [1, 1, 28, 28]}}'), {422}),
    "base64 with a negative shape": (_predict('{"inputs": {"data": "AAAA", "shape": [-1, 28, 28]}}'), {422}),
    "base64 with a huge shape": (_predict('{"inputs": {"data": "AAAA", "shape": [1000000000, 1, 28, 28]}}'), {422}),
    "base64 data not a string": (_predict('{"inputs": {"data": 5, "shape": [1, 1, 28, 28]}}'), {422}),
    "base64 object with extra keys": (_predict('{"inputs": {"data": "", "shape": [1], "x": 1}}'), {422}),
    # framing, smuggling and headers
    "Transfer-Encoding and Content-Length": (_raw("POST /v1/predict HTTP/1.1\nHost: x\nContent-Length: 4\n"
                                                  "Transfer-Encoding: chunked\n\n", b"0\r\n\r\n"), {400}),
    "two different Content-Lengths": (_raw("POST /v1/predict HTTP/1.1\nHost: x\nContent-Length: 2\n"
                                           "Content-Length: 3\n\n", b"{}"), {400}),
    "negative Content-Length": (_raw("POST /v1/predict HTTP/1.1\nHost: x\nContent-Length: -1\n\n"), {400}),
    "Content-Length not a number": (_raw("POST /v1/predict HTTP/1.1\nHost: x\nContent-Length: abc\n\n"), {400}),
    "Content-Length far over the limit": (_raw("POST /v1/predict HTTP/1.1\nHost: x\nContent-Length: 999999999999\n\n",
                                               b"{}"), {400, 413}),
    "chunk size bomb": (_raw("POST /v1/predict HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n",
                             b"FFFFFFFFFFFFFFFF\r\n" + b"a" * 1000), {400, 408, 413}),
    "chunked body over the limit": (_raw("POST /v1/predict HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n",
                                         b"".join(b"8000\r\n" + b"0" * 0x8000 + b"\r\n" for _ in range(4))
                                         + b"0\r\n\r\n"), {413}),
    "bad chunk encoding": (_raw("POST /v1/predict HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n", b"zz\r\n"),
                           {400}),
    "header line without colon": (_raw("POST /v1/predict HTTP/1.1\nHost x\n\n"), {400}),
    "100 KB header": (_raw("GET /healthz HTTP/1.1\nHost: x\nX-Big: " + "a" * 100_000 + "\n\n"), {431}),
    "10,000 headers": (_raw("GET /healthz HTTP/1.1\nHost: x\n" + "".join(f"X-{i}: v\n" for i in range(10_000)) + "\n"),
                       {431}),
    "100 KB URL": (_raw("GET /" + "a" * 100_000 + " HTTP/1.1\nHost: x\n\n"), {400, 404, 414, 431}),
    "NUL byte in the path": (_raw("GET /heal\x00thz HTTP/1.1\nHost: x\n\n"), {400, 404}),
    "unknown method": (_raw("BREW /v1/predict HTTP/1.1\nHost: x\n\n"), {400, 405}),
    "GET on predict": (_http("GET", "/v1/predict"), {405}),
    "unknown path": (_http("GET", "/admin"), {404}),
    "not HTTP at all": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, {400}),
    "HTTP/2 preface on HTTP/1.1": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 404, 405, 505}),
}


def _exchange(port: int, raw: bytes, timeout_s: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` on a fresh connection; (status, headers, body) of the first response."""
    with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer (and close) before taking a too-large request whole
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep and len(rest) >= int(_headers(head).get("content-length", "0")):
                break
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), f"no HTTP response: {data[:200]!r}"
    headers = _headers(head)
    return int(head.split()[1]), headers, body[: int(headers.get("content-length", len(body)))]


def _headers(head: bytes) -> dict[str, str]:
    """The header fields of a response head (status line first), names lower-cased."""
    return {k.strip().lower(): v.strip() for k, _, v in
            (line.decode("latin-1").partition(":") for line in head.split(b"\r\n")[1:])}


@pytest.fixture(scope="module")
def parm_server(tiny_checkpoints: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    base, parity = tiny_checkpoints
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "parm.cli", "serve", "--base", str(base), "--parity", str(parity),
                                 "--mode", "coded", "--instances", "2", "--host", HOST, "--port", "0",
                                 "--max-body-bytes", "65536", "--header-timeout", "1", "--body-timeout", "1"],
                                stdout=subprocess.PIPE, stderr=err, text=True)
        line = proc.stdout.readline()
        if not line.startswith("ready http://"):
            proc.kill()
            pytest.fail(f"parm serve did not start: {line!r} {log.read_text()[-2000:]}")
        try:
            yield int(line.strip().rsplit(":", 1)[1]), proc, log
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def test_there_are_at_least_40_hostile_requests() -> None:
    assert len(HOSTILE) >= 40


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_request_gets_a_json_4xx_and_the_server_lives(name: str, parm_server) -> None:
    port, proc, _ = parm_server
    raw, allowed = HOSTILE[name]
    status, headers, body = _exchange(port, raw)
    assert status in allowed, (status, body[:300])
    document = json.loads(body)  # every body is valid JSON (no bare NaN, no text/plain)
    if status >= 400:
        assert document["error"]["message"]
    else:
        assert all(all(x == x and abs(x) != float("inf") for x in o["scores"]) for o in document["outputs"])
    assert proc.poll() is None


def test_slowloris_connections_are_dropped_and_honest_clients_are_served(parm_server) -> None:
    port, proc, _ = parm_server
    socks = [socket.create_connection((HOST, port)) for _ in range(30)]
    try:
        for sock in socks:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n")  # never finished
        time.sleep(2.5)  # past --header-timeout 1
        for sock in socks:
            sock.settimeout(1.0)
            assert sock.recv(1) == b"", "a half-sent request was still held open"
    finally:
        for sock in socks:
            sock.close()
    status, _, body = _exchange(port, _predict('{"inputs": [' + PIXELS + "]}"))
    assert status == 200 and len(json.loads(body)["outputs"]) == 1


def test_after_the_onslaught_the_server_is_healthy_and_logged_no_traceback(parm_server) -> None:
    port, proc, log = parm_server
    for raw, _ in HOSTILE.values():  # all of them again, back to back
        _exchange(port, raw)
    status, _, body = _exchange(port, _http("GET", "/healthz"))
    assert status == 200 and json.loads(body)["ok"] is True and proc.poll() is None
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
