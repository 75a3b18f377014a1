"""parm.http without a server: parse_queries on every accepted and rejected form; the ASGI app driven
directly (hand-made scope / receive / send) over a fake PredictService with knobs."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from parm.errors import BadQueryError, ConfigError, DeadlineExceededError, OverloadedError
from parm.http import HttpLimits, make_app, parse_queries
from parm.serving.metrics import ServingMetrics
from parm.serving.types import Prediction, Source

SHAPE = (1, 2, 3)  # small query shape: 6 values
SIZE = 6
LIMITS = HttpLimits()


def body(inputs) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


def b64(values, dtype="<f4") -> str:
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode()


def rejected(body_bytes: bytes, limits: HttpLimits = LIMITS) -> BadQueryError:
    with pytest.raises(BadQueryError) as info:
        parse_queries(body_bytes, SHAPE, limits)
    return info.value


Q0 = [float(i) for i in range(SIZE)]
Q1 = [float(10 + i) for i in range(SIZE)]
NESTED0 = np.asarray(Q0).reshape(SHAPE).tolist()


# --------------------------------------------------------------------------------------- HttpLimits


def test_limits_defaults_and_validation() -> None:
    assert HttpLimits().max_body_bytes == 8 * 1024 * 1024
    assert HttpLimits().max_queries_per_request == 1024
    for bad in (0, -1, True, 1.5, "8"):
        with pytest.raises(ConfigError, match="max_body_bytes"):
            HttpLimits(max_body_bytes=bad)
        with pytest.raises(ConfigError, match="max_queries_per_request"):
            HttpLimits(max_queries_per_request=bad)


# ------------------------------------------------------------------------------------ parse: good


@pytest.mark.parametrize("inputs", [
    [Q0, Q1],  # flat
    [NESTED0, np.asarray(Q1).reshape(SHAPE).tolist()],  # nested
    [NESTED0, Q1],  # mixed forms
])
def test_parse_lists(inputs) -> None:
    out = parse_queries(body(inputs), SHAPE, LIMITS)
    assert out.dtype == torch.float32 and out.shape == (2, *SHAPE)
    assert out.reshape(2, -1).tolist() == [Q0, Q1]


def test_parse_integers_and_float32_rounding() -> None:
    out = parse_queries(body([[1, 2, 3, 4, 5, 6]]), SHAPE, LIMITS)
    assert out.reshape(-1).tolist() == [1, 2, 3, 4, 5, 6]
    out = parse_queries(body([[0.1] * SIZE]), SHAPE, LIMITS)
    assert out[0, 0, 0, 0].item() == np.float32(0.1)


def test_parse_unrelated_true_false_elsewhere_is_fine() -> None:
    raw = json.dumps({"inputs": [Q0], "note": "true or false", "flag": True}).encode()
    assert parse_queries(raw, SHAPE, LIMITS).shape == (1, *SHAPE)


@pytest.mark.parametrize("shape,n", [([1, 2, 3], 1), ([6], 1), ([2, 1, 2, 3], 2), ([2, 6], 2)])
def test_parse_base64_shapes(shape, n) -> None:
    values = np.arange(n * SIZE, dtype=np.float32)
    out = parse_queries(body({"data": b64(values), "shape": shape}), SHAPE, LIMITS)
    assert out.shape == (n, *SHAPE) and out.dtype == torch.float32
    assert out.reshape(-1).tolist() == values.tolist()
    out[0, 0, 0, 0] = 7.0  # writable, not a view of the request bytes


def test_parse_base64_list_of_objects() -> None:
    objs = [{"data": b64(Q0), "shape": [6]}, {"data": b64(Q1 + Q0), "shape": [2, 1, 2, 3]}]
    out = parse_queries(body(objs), SHAPE, LIMITS)
    assert out.reshape(3, -1).tolist() == [Q0, Q1, Q0]


def test_parse_base64_is_little_endian() -> None:
    big = base64.b64encode(np.asarray(Q1, dtype=">f4").tobytes()).decode()
    out = parse_queries(body({"data": big, "shape": [6]}), SHAPE, LIMITS)
    assert out.reshape(-1).tolist() != Q1  # big-endian bytes are not reinterpreted
    assert parse_queries(body({"data": b64(Q1), "shape": [6]}), SHAPE, LIMITS).reshape(-1).tolist() == Q1


# ------------------------------------------------------------------------------------- parse: bad


@pytest.mark.parametrize("raw", [b"", b"{", b'{"inputs": [[1,2]]', b"\xff\xfe\x00garbage", b"[" * 100_000])
def test_malformed_json_is_400(raw) -> None:
    err = rejected(raw)
    assert err.status == 400
    assert "not valid JSON" in str(err) or "nests too deeply" in str(err)


@pytest.mark.parametrize("raw,words", [
    (b"[1, 2]", "body is a list; expected a JSON object"),
    (b'"x"', "body is a string"),
    (b'{"input": []}', 'no "inputs" key'),
    (b'{"inputs": 3}', "inputs is a number; expected a list of queries"),
    (b'{"inputs": "abc"}', "inputs is a string"),
    (b'{"inputs": null}', "inputs is null"),
    (b'{"inputs": []}', "inputs is empty"),
])
def test_wrong_structure_is_422(raw, words) -> None:
    err = rejected(raw)
    assert err.status == 422 and words in str(err)


@pytest.mark.parametrize("inputs,words", [
    ([Q0, Q0[:5]], "inputs[1] has 5 values; expected 6 (shape [1, 2, 3]) or a nested list of shape [1, 2, 3]"),
    ([Q0 + [1.0]], "inputs[0] has 7 values; expected 6"),
    ([[]], "inputs[0] has 0 values"),
    ([[[Q0[:3], Q0[3:]]], [[[1, 2], [3, 4]]]], "inputs[1] is a nested list of shape [1, 2, 2]"),
    ([[[[1, 2, 3], [4, 5]]]], "inputs[0] is a ragged nested list; expected 6 values"),
    ([np.asarray(Q0).reshape(2, 3).tolist()], "inputs[0] is a nested list of shape [2, 3]"),
    ([Q0, 5], "inputs[1] is a number; expected 6 values"),
    ([Q0, "abc"], "inputs[1] is a string"),
    ([Q0, None], "inputs[1] is null"),
    ([Q0, {"data": "AAAA", "shape": [1]}], "inputs[1] is an object"),
    ([Q0[:5] + ["1"]], "inputs[0][5] is a string; expected a number"),
    ([Q0[:5] + [None]], "inputs[0][5] is null; expected a number"),
    ([Q0[:5] + [True]], "inputs[0][5] is a boolean (true); expected a number"),
    ([Q0, [False] * SIZE], "inputs[1][0] is a boolean (false)"),
    ([[[[1, 2, 3], [4, 5, {"a": 1}]]]], "inputs[0][0][1][2] is an object; expected a number"),
    (Q0, "inputs is one flat query of 6 numbers; wrap it in a list"),
])
def test_bad_list_queries_are_422_and_name_the_fault(inputs, words) -> None:
    err = rejected(body(inputs))
    assert err.status == 422
    assert words in str(err)


def test_bools_are_found_in_utf16_bodies_too() -> None:
    assert parse_queries(json.dumps({"inputs": [Q0]}).encode("utf-16"), SHAPE, LIMITS).shape == (1, *SHAPE)
    err = rejected(json.dumps({"inputs": [Q0[:5] + [True]]}).encode("utf-16"))
    assert "inputs[0][5] is a boolean (true)" in str(err)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e39", "-3.5e38"])
def test_non_finite_list_values_are_422(token) -> None:
    raw = ('{"inputs": [[0,0,0,0,0,0], [1,2,' + token + ',4,5,6]]}').encode()
    err = rejected(raw)
    assert err.status == 422 and "inputs[1] has a non-finite value" in str(err) and "flat index 2" in str(err)


def test_huge_integer_is_finite_check_not_a_crash() -> None:
    err = rejected(b'{"inputs": [[1,2,3,4,5,%d]]}' % (10**400))
    assert err.status == 422 and "inputs[0]" in str(err)


@pytest.mark.parametrize("obj,words", [
    ({"data": 5, "shape": [6]}, "inputs.data is a number; expected a base64 string"),
    ({"shape": [6]}, "inputs.data is null"),
    ({"data": b64(Q0)}, "inputs.shape is null; expected a non-empty list of non-negative integers"),
    ({"data": b64(Q0), "shape": [6.0]}, "inputs.shape is [6.0]"),
    ({"data": b64(Q0), "shape": [True, 6]}, "inputs.shape"),
    ({"data": b64(Q0), "shape": []}, "inputs.shape is []"),
    ({"data": b64(Q0), "shape": "6"}, "inputs.shape is \"6\""),
    ({"data": b64(Q0), "shape": [2, 3]}, "inputs.shape is [2, 3]; expected [1, 2, 3], [N, 1, 2, 3], [6] or [N, 6]"),
    ({"data": b64(Q0), "shape": [0, 6]}, "no queries"),
    ({"data": b64(Q0), "shape": [6], "dtype": "float64"}, "unknown key(s) ['dtype']"),
    ({"data": "not base64!", "shape": [6]}, "inputs.data is not valid base64"),
    ({"data": b64(Q0)[:-1], "shape": [6]}, "inputs.data is not valid base64"),
    ({"data": "é" * 8, "shape": [6]}, "inputs.data is not valid base64"),
    ({"data": base64.b64encode(b"\x00" * 23).decode(), "shape": [6]}, "decodes to 23 bytes, not a multiple of 4"),
    ({"data": b64(Q0[:5]), "shape": [6]}, "inputs.data holds 5 float32 values; shape [6] needs 6"),
    ({"data": b64(Q0), "shape": [2, 6]}, "holds 6 float32 values; shape [2, 6] needs 12"),
    ({"data": b64(Q0 + Q0[:5] + [float("nan")]), "shape": [2, 6]},
     "inputs.data query 1 (query 1 of the request) has a non-finite value (nan) at flat index 5"),
    ({"data": b64([float("inf")] + Q0[1:]), "shape": [6]}, "non-finite value (inf)"),
])
def test_bad_base64_objects_are_422(obj, words) -> None:
    err = rejected(body(obj))
    assert err.status == 422
    assert words in str(err)


def test_bad_base64_in_list_names_the_element() -> None:
    good = {"data": b64(Q0), "shape": [6]}
    err = rejected(body([good, {"data": b64(Q0), "shape": [5]}]))
    assert "inputs[1].shape is [5]" in str(err)
    err = rejected(body([good, Q0]))
    assert "inputs[1] is a list; inputs[0] is a base64 object" in str(err)
    err = rejected(body([good, {"data": b64([float("nan")] * 6), "shape": [6]}]))
    assert "inputs[1].data query 0 (query 1 of the request)" in str(err)


def test_a_big_body_of_json_number_lists_is_413_before_parsing_but_base64_may_be_big() -> None:
    limits = HttpLimits(max_body_bytes=1 << 22, max_json_array_bytes=2048, max_queries_per_request=10_000)
    many = [Q0] * 1000  # ~ 14 KB of JSON numbers
    err = rejected(body(many), limits)
    assert err.status == 413 and "JSON number lists may be at most 2048 bytes" in str(err) and "base64" in str(err)
    assert parse_queries(body({"data": b64(Q0 * 1000), "shape": [1000, 6]}), SHAPE, limits).shape == (1000, *SHAPE)
    assert parse_queries(body([Q0] * 10), SHAPE, limits).shape == (10, *SHAPE)  # small JSON is fine


def test_too_many_queries_is_422() -> None:
    limits = HttpLimits(max_queries_per_request=3)
    assert parse_queries(body([Q0] * 3), SHAPE, limits).shape[0] == 3
    for inputs in ([Q0] * 4, {"data": b64(Q0 * 4), "shape": [4, 6]},
                   [{"data": b64(Q0 * 2), "shape": [2, 6]}, {"data": b64(Q0 * 2), "shape": [2, 6]}]):
        err = rejected(body(inputs), limits)
        assert err.status == 422 and "too many queries: 4 > max_queries_per_request=3" in str(err)


# -------------------------------------------------------------------------------------- fake service


@dataclass
class FakeService:
    """A PredictService with knobs. Scores are each query's first 3 values, so tests can check the path."""

    query_shape: tuple[int, ...] = SHAPE
    fail_with: BaseException | None = None  # raised by the next predict (then cleared)
    ok: bool = True
    gate: asyncio.Event | None = None  # when set, predict waits for it
    metrics: ServingMetrics | None = None
    calls: list[torch.Tensor] = field(default_factory=list)
    tenants: list[str | None] = field(default_factory=list)

    async def predict(self, queries: torch.Tensor, *, tenant: str | None = None) -> list[Prediction]:
        self.calls.append(queries)
        self.tenants.append(tenant)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            exc, self.fail_with = self.fail_with, None
            raise exc
        scores = queries.reshape(queries.shape[0], -1)[:, :3]  # (N, size) -> (N, 3)
        if self.metrics is not None:
            self.metrics.queries.labels(source="original").inc(queries.shape[0])
        return [Prediction(scores=s, label=int(s.argmax()), source=Source.ORIGINAL, latency_ms=1.23456, instance=0)
                for s in scores]

    def health(self) -> dict:
        return {"ok": self.ok, "instances": [{"id": 0, "role": "data", "healthy": self.ok}]}


# ------------------------------------------------------------------------------------- ASGI driver


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def call(app, method: str, path: str, chunks: list[bytes] = (), headers: list[tuple[bytes, bytes]] = (),
         disconnect_first: bool = False, send_raises: bool = False) -> Response | None:
    """Drive the ASGI app with one request; returns None when it sent nothing."""
    return asyncio.run(acall(app, method, path, chunks, headers, disconnect_first, send_raises))


async def acall(app, method, path, chunks=(), headers=(), disconnect_first=False, send_raises=False):
    chunks = list(chunks) or [b""]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    if disconnect_first:
        messages = []
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        if send_raises:
            raise ConnectionResetError("client went away")
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "headers": list(headers), "scheme": "http",
             "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 8000)}
    await app(scope, receive, send)
    if not sent:
        return None
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    hdrs = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    assert int(hdrs["content-length"]) == len(sent[1]["body"])
    return Response(sent[0]["status"], hdrs, sent[1]["body"])


@pytest.fixture
def setup():
    metrics = ServingMetrics()
    service = FakeService(metrics=metrics)
    return make_app(service, metrics, HttpLimits(max_body_bytes=4096, max_queries_per_request=8)), service, metrics


def rejected_count(metrics: ServingMetrics, reason: str) -> float:
    return metrics.registry.get_sample_value("parm_rejected_queries_total", {"reason": reason}) or 0.0


def predict(app, payload, **kw) -> Response:
    return call(app, "POST", "/v1/predict", [payload if isinstance(payload, bytes) else body(payload)], **kw)


# --------------------------------------------------------------------------------------- app: routes


def test_predict_lists(setup) -> None:
    app, service, metrics = setup
    r = predict(app, [Q0, Q1])
    assert r.status == 200 and r.headers["content-type"] == "application/json"
    outputs = r.json()["outputs"]
    assert [o["scores"] for o in outputs] == [Q0[:3], Q1[:3]]
    assert outputs[0] == {"class": 2, "scores": Q0[:3], "source": "original", "latency_ms": 1.235}
    assert service.calls[-1].shape == (2, *SHAPE) and service.calls[-1].dtype == torch.float32


def test_the_tenant_header_names_the_requests_tenant_only_when_configured(setup) -> None:
    app, service, metrics = setup
    assert predict(app, [Q0], headers=[(b"x-api-key", b"alice")]).status == 200
    assert service.tenants[-1] is None  # not configured: nobody's header is read
    app = make_app(service, metrics, HttpLimits(), tenant_header="X-Api-Key")
    assert predict(app, [Q0], headers=[(b"x-api-key", b"alice")]).status == 200
    assert predict(app, [Q0]).status == 200
    assert service.tenants[-2:] == ["alice", ""]  # no header: the tenant ""
    calls = len(service.calls)
    for headers in ([(b"x-api-key", b"a"), (b"x-api-key", b"b")], [(b"x-api-key", b"x" * 257)]):
        r = predict(app, [Q0], headers=headers)
        assert r.status == 400 and r.json()["error"]["type"] == "bad_tenant"
        assert "x-api-key header" in r.json()["error"]["message"]
    assert len(service.calls) == calls and rejected_count(metrics, "bad_query") == 2


def test_predict_base64_in_chunks(setup) -> None:
    app, service, _ = setup
    raw = body({"data": b64(Q1 + Q0), "shape": [2, 6]})
    r = call(app, "POST", "/v1/predict", [raw[:7], raw[7:30], b"", raw[30:]])
    assert r.status == 200 and [o["scores"] for o in r.json()["outputs"]] == [Q1[:3], Q0[:3]]


def test_bad_query_is_422_with_field_and_counted(setup) -> None:
    app, service, metrics = setup
    r = predict(app, [Q0, Q0[:5]])
    assert r.status == 422
    err = r.json()["error"]
    assert err["type"] == "bad_query" and err["field"] == "inputs[1]" and "has 5 values; expected 6" in err["message"]
    assert rejected_count(metrics, "bad_query") == 1
    assert not service.calls


def test_app_answers_malformed_json_with_400(setup) -> None:
    app, _, metrics = setup
    r = predict(app, b"{nope")
    assert r.status == 400 and r.json()["error"]["type"] == "bad_query"
    assert rejected_count(metrics, "bad_query") == 1


def test_app_answers_too_many_queries_with_422(setup) -> None:
    app, _, _ = setup
    r = predict(app, [Q0] * 9)
    assert r.status == 422 and "too many queries: 9 > max_queries_per_request=8" in r.json()["error"]["message"]


@pytest.mark.parametrize("status", [429, 503])
def test_overloaded_maps_to_its_status_with_retry_after(setup, status) -> None:
    app, service, metrics = setup
    service.fail_with = OverloadedError("queue full", limit="max_pending_queries", status=status)
    r = predict(app, [Q0, Q1, Q0])
    assert r.status == status and r.headers["retry-after"] == "1"
    assert r.json()["error"] == {"type": "overloaded", "message": "queue full", "limit": "max_pending_queries"}
    assert rejected_count(metrics, "overloaded") == 3  # the request's queries


def test_deadline_is_504(setup) -> None:
    app, service, _ = setup
    service.fail_with = DeadlineExceededError("no answer within 0.5 s", deadline_s=0.5)
    r = predict(app, [Q0])
    assert r.status == 504
    assert r.json()["error"] == {"type": "deadline_exceeded", "message": "no answer within 0.5 s", "deadline_s": 0.5}


def test_service_bad_query_uses_its_status(setup) -> None:
    app, service, metrics = setup
    service.fail_with = BadQueryError("wrong channel count", field="inputs", status=400)
    r = predict(app, [Q0, Q1])
    assert r.status == 400 and r.json()["error"]["message"] == "wrong channel count"
    assert rejected_count(metrics, "bad_query") == 2


def test_unexpected_error_is_generic_500_logged_and_server_keeps_serving(setup, caplog) -> None:
    app, service, _ = setup
    service.fail_with = RuntimeError("secret internal detail")
    with caplog.at_level(logging.ERROR, logger="parm.http"):
        r = predict(app, [Q0])
    assert r.status == 500
    assert r.json()["error"]["type"] == "internal" and "secret" not in r.body.decode()
    assert any(rec.exc_info and "secret internal detail" in str(rec.exc_info[1]) for rec in caplog.records)
    assert predict(app, [Q0]).status == 200


def test_wrong_prediction_count_is_500(setup, monkeypatch) -> None:
    app, service, _ = setup

    async def short(queries):
        return []
    monkeypatch.setattr(service, "predict", short)
    assert predict(app, [Q0]).status == 500


def test_body_over_limit_is_413_while_reading(setup) -> None:
    app, service, metrics = setup
    r = call(app, "POST", "/v1/predict", [b"x" * 3000, b"x" * 2000, b"never read"])
    assert r.status == 413 and r.json()["error"]["type"] == "body_too_large"
    assert r.headers["connection"] == "close" and "4096" in r.json()["error"]["message"]
    assert rejected_count(metrics, "body_too_large") == 1 and not service.calls


def test_content_length_over_limit_is_413_and_a_huge_one_is_not_read(setup) -> None:
    """Over the limit but within DRAIN_BYTES: read away (so a client still sending sees the 413),
    never kept; past DRAIN_BYTES: refused without reading a byte (the connection then closes)."""
    from parm.http import DRAIN_BYTES

    app, _, _ = setup

    async def run(declared: int, chunks: list[bytes] | None):
        async def receive():
            if chunks is None:
                raise AssertionError("the body must not be read")
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}
        sent = []

        async def send(m):
            sent.append(m)
        scope = {"type": "http", "method": "POST", "path": "/v1/predict",
                 "headers": [(b"content-length", str(declared).encode())]}
        await app(scope, receive, send)
        return sent
    chunks = [b"x" * 2500, b"x" * 2500]
    sent = asyncio.run(run(5000, chunks))
    assert sent[0]["status"] == 413 and chunks == []  # drained
    assert asyncio.run(run(DRAIN_BYTES + 1, None))[0]["status"] == 413


def test_body_at_limit_is_read(setup) -> None:
    app, _, _ = setup
    raw = body([Q0])
    raw = raw + b" " * (4096 - len(raw))
    assert predict(app, raw, headers=[(b"content-length", b"4096")]).status == 200


def test_bad_content_length_is_400(setup) -> None:
    app, _, _ = setup
    r = predict(app, body([Q0]), headers=[(b"content-length", b"abc")])
    assert r.status == 400


def test_healthz(setup) -> None:
    app, service, _ = setup
    r = call(app, "GET", "/healthz")
    assert r.status == 200 and r.json()["ok"] is True and r.json()["instances"][0]["role"] == "data"
    service.ok = False
    r = call(app, "GET", "/healthz")
    assert r.status == 503 and r.json()["ok"] is False
    assert call(app, "HEAD", "/healthz").status == 503


def test_metrics(setup) -> None:
    app, _, _ = setup
    predict(app, [Q0, Q1])
    predict(app, [Q0[:2]])
    r = call(app, "GET", "/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.body.decode()
    assert 'parm_queries_total{source="original"} 2.0' in text
    assert 'parm_rejected_queries_total{reason="bad_query"} 1.0' in text


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/v1/predict", 405), ("PUT", "/healthz", 405), ("POST", "/metrics", 405),
    ("GET", "/", 404), ("POST", "/v1/predict/", 404), ("GET", "/v2/predict", 404),
])
def test_routing_errors(setup, method, path, status) -> None:
    app, _, _ = setup
    r = call(app, method, path)
    assert r.status == status
    assert r.json()["error"]["type"] == ("method_not_allowed" if status == 405 else "not_found")
    if status == 405:
        assert r.headers["allow"] in ("GET", "POST")


def test_disconnect_before_body_sends_nothing(setup) -> None:
    app, service, _ = setup
    assert call(app, "POST", "/v1/predict", disconnect_first=True) is None
    assert not service.calls


def test_send_failing_after_disconnect_does_not_raise(setup) -> None:
    app, _, _ = setup
    assert predict(app, [Q0], send_raises=True) is None
    assert predict(app, [Q0]).status == 200


def test_disconnect_while_waiting_then_next_request_works(setup) -> None:
    app, service, _ = setup

    async def run():
        service.gate = asyncio.Event()
        first = asyncio.create_task(acall(app, "POST", "/v1/predict", [body([Q0])], send_raises=True))
        while not service.calls:
            await asyncio.sleep(0)
        service.gate.set()  # the answer arrives after the client left
        assert await first is None
        service.gate = None
        return await acall(app, "POST", "/v1/predict", [body([Q1])])
    assert asyncio.run(run()).status == 200


def test_lifespan() -> None:
    app = make_app(FakeService(), ServingMetrics())

    async def run():
        inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent = []

        async def receive():
            return inbox.pop(0)

        async def send(m):
            sent.append(m["type"])
        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        return sent
    assert asyncio.run(run()) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_large_body_is_parsed_off_the_loop(setup) -> None:
    metrics = ServingMetrics()
    service = FakeService(metrics=metrics)
    app = make_app(service, metrics, HttpLimits(max_body_bytes=1 << 22, max_queries_per_request=100_000))
    payload = body([Q0] * 20_000)
    assert len(payload) > 256 * 1024
    r = predict(app, payload)
    assert r.status == 200 and len(r.json()["outputs"]) == 20_000
