"""HTTP adapter over a :class:`~parm.serving.types.PredictService`: a raw ASGI app run by uvicorn.

Routes::

    POST /v1/predict   {"inputs": X} -> 200 {"outputs": [{"class", "scores", "source", "latency_ms"}, ...]}
    GET  /healthz      service.health() as JSON; 200 while it is 'serving' (all up, or degraded), else 503
    GET  /metrics      Prometheus text format of the frontend's registry

``X`` is a list of queries (each a flat list of prod(query_shape) numbers or a nested list of exactly
query_shape), or one object / a list of objects ``{"data": BASE64_FLOAT32_LE, "shape": [...]}`` whose
shape is query_shape, [N, *query_shape], [prod] or [N, prod] (see :func:`parse_queries`).

Errors become ``{"error": {"type": ..., "message": ..., ...}}`` here, at the edge only:

=========================  ======================================================
BadQueryError              its status (400 malformed JSON, 422 everything else)
body over max_body_bytes   413 (checked from Content-Length and while reading)
OverloadedError            its status (429 or 503) with ``Retry-After: 1``
DeadlineExceededError      504
ModelFailedError           its status: 422 for non-finite scores (the query's values), 500 when the model raised
anything else              500 with a generic message; the traceback is logged
unknown path / method      404 / 405 (with ``Allow``)
=========================  ======================================================

With a tenant header configured (``tenant_header``), its value names the request's tenant; a
repeated header or a value over MAX_TENANT_BYTES gets 400.

Refusals are counted in ``metrics.rejected`` by reason: ``bad_query`` and ``overloaded`` count the
request's queries when they were parsed (else 1), ``body_too_large`` counts 1 per request.
A client that disconnects while its queries are being answered is not an error: the answer is
computed (the frontend's coding groups stay whole) and dropped.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import inspect
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from parm.errors import BadQueryError, ConfigError, DeadlineExceededError, ModelFailedError, OverloadedError
from parm.serving.metrics import ServingMetrics
from parm.serving.recorder import InputRecorder
from parm.serving.types import PredictService

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DRAIN_BYTES = 64 * 1024 * 1024  # a too-large body up to this is read away before its 413 (see _drain)
MAX_TENANT_BYTES = 256  # a longer tenant header value gets 400
MAX_HEADER_BYTES = 64 * 1024  # a request line and headers larger than this get 431 and the connection closes
_ARRAY_COMMAS = 4096  # a body with more commas than this is JSON number lists, not the base64 form
_OFFLOAD_BODY_BYTES = 256 * 1024  # parse bodies larger than this in a thread, off the shared event loop
_BASE64_KEYS = frozenset({"data", "shape"})


# --------------------------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class HttpLimits:
    """Per-request limits of the HTTP adapter."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_json_array_bytes: int = 1024 * 1024  # a body of JSON number lists above this: 413 (use the base64 form)
    max_queries_per_request: int = 1024
    header_timeout_s: float = 10.0  # a request's headers must arrive within this (slowloris), else the connection closes
    body_timeout_s: float = 30.0  # longest wait for the next piece of a body, else 408 and close
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 1000  # beyond this many open connections, new requests get 503 and are closed

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_json_array_bytes", "max_queries_per_request", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"HttpLimits.{name} must be a positive integer; got {value!r}",
                                  field=name, value=value)
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"HttpLimits.{name} must be > 0; got {getattr(self, name)!r}", field=name,
                                  value=getattr(self, name))


# -------------------------------------------------------------------------------------------- parsing


def parse_queries(body: bytes, query_shape: tuple[int, ...], limits: HttpLimits = HttpLimits()) -> torch.Tensor:
    """Decode a predict body into queries (N, *query_shape) float32; raise BadQueryError naming the fault.

    Numbers are converted by numpy in one call per request (per query only when the request is
    malformed or mixes flat and nested queries), so no Python work is done per number.
    """
    qshape = tuple(int(d) for d in query_shape)
    if len(body) > limits.max_json_array_bytes and body.count(b",") > _ARRAY_COMMAS:
        # numbers as JSON text cost ~50 ns each to parse, holding the GIL: past this size, refuse before
        # parsing (cheap: one pass of bytes.count); the base64 form holds a few commas, not thousands
        raise BadQueryError(f"a body of JSON number lists may be at most {limits.max_json_array_bytes} bytes (this one "
                            f"is {len(body)}); send large inputs as base64 float32 "
                            '({"inputs": {"data": BASE64, "shape": [N, ...]}}) or in several requests',
                            field="body", status=413)
    inputs = _inputs_of(_load_json(body))
    if isinstance(inputs, dict):
        arr = _from_base64_objects([inputs], qshape, limits, single=True)
    elif isinstance(inputs, list):
        if not inputs:
            raise BadQueryError("inputs is empty; send at least one query", field="inputs")
        if isinstance(inputs[0], dict):
            arr = _from_base64_objects(inputs, qshape, limits, single=False)
        else:
            arr = _from_lists(inputs, qshape, limits, body)
    else:
        raise BadQueryError(f"inputs is {_kind(inputs)}; expected a list of queries or a base64 object "
                            '{"data": ..., "shape": [...]}', field="inputs")
    return torch.from_numpy(arr)  # (N, *query_shape) float32


def _load_json(body: bytes) -> Any:
    """The parsed body: orjson (several times faster than the standard library on number arrays, so
    a big body holds the event loop's GIL for less); what it refuses — UTF-16/32, NaN/Infinity
    literals, integers past 64 bits, or plain garbage — goes to the standard library, which reads
    the first three (they are then refused with a precise message) and names the fault of the last."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nests too deeply" if isinstance(exc, RecursionError) else f"is not valid JSON ({exc})"
        raise BadQueryError(f'body {reason}; expected a JSON object {{"inputs": [...]}}',
                            field="body", status=400) from None


def _inputs_of(doc: Any) -> Any:
    if not isinstance(doc, dict):
        raise BadQueryError(f'body is {_kind(doc)}; expected a JSON object {{"inputs": [...]}}', field="body")
    if "inputs" not in doc:
        raise BadQueryError('body has no "inputs" key; expected {"inputs": [query, ...]} or '
                            '{"inputs": {"data": BASE64_FLOAT32_LE, "shape": [...]}}', field="inputs")
    return doc["inputs"]


def _check_count(n: int, limits: HttpLimits) -> None:
    if n > limits.max_queries_per_request:
        raise BadQueryError(f"too many queries: {n} > max_queries_per_request={limits.max_queries_per_request}; "
                            "split them over several requests", field="inputs")


def _from_lists(inputs: list, qshape: tuple[int, ...], limits: HttpLimits, body: bytes) -> np.ndarray:
    """Queries as JSON number lists -> (N, *qshape) float32: one numpy conversion when well formed."""
    n, size = len(inputs), math.prod(qshape)
    _check_count(n, limits)
    # numpy would take a bool as 0/1. In UTF-8 a bool can only come from these literals; other encodings: walk.
    if b"true" in body or b"false" in body or json.detect_encoding(body) != "utf-8":
        _reject_bools(inputs)
    try:
        arr = np.asarray(inputs)  # float64 / int64 when every query is well formed
    except (ValueError, TypeError, OverflowError):  # ragged, or mixed flat and nested queries
        arr = None
    if arr is not None and arr.dtype.kind in "iuf" and arr.shape in ((n, size), (n, *qshape)):
        out = _to_float32(arr).reshape(n, *qshape)  # (N, size) or (N, *qshape) -> (N, *qshape)
        _check_finite(out, lambda i: f"inputs[{i}]")
        return out
    if arr is not None and arr.ndim == 1 and arr.dtype.kind in "iuf" and n == size:
        raise BadQueryError(f"inputs is one flat query of {n} numbers; wrap it in a list: "
                            '{"inputs": [[...]]}', field="inputs")
    queries = [_one_list_query(q, f"inputs[{i}]", qshape, size) for i, q in enumerate(inputs)]
    out = np.stack(queries)  # N x (*qshape) -> (N, *qshape)
    _check_finite(out, lambda i: f"inputs[{i}]")
    return out


def _one_list_query(q: Any, field: str, qshape: tuple[int, ...], size: int) -> np.ndarray:
    """One query (flat or nested list) -> (*qshape) float32, or a BadQueryError saying what is wrong."""
    expected = f"expected {size} values (shape {_fmt(qshape)}) or a nested list of shape {_fmt(qshape)}"
    if not isinstance(q, list):
        raise BadQueryError(f"{field} is {_kind(q)}; {expected}", field=field)
    try:
        a = np.asarray(q)
    except (ValueError, TypeError, OverflowError):
        raise BadQueryError(f"{field} is a ragged nested list; {expected}", field=field) from None
    if a.dtype.kind not in "iuf":
        a = _numbers_or_raise(q, field)
    if a.shape == (size,) or a.shape == qshape:
        return _to_float32(a).reshape(qshape)  # (size,) or qshape -> qshape
    if a.ndim == 1:
        raise BadQueryError(f"{field} has {a.shape[0]} values; expected {size} (shape {_fmt(qshape)}) "
                            f"or a nested list of shape {_fmt(qshape)}", field=field)
    raise BadQueryError(f"{field} is a nested list of shape {_fmt(a.shape)}; {expected}", field=field)


def _numbers_or_raise(q: list, field: str) -> np.ndarray:
    """A list numpy could not take as numbers: name its first non-number, or convert huge integers."""
    path, value = _first_leaf(q, field, lambda v: not isinstance(v, (int, float)) or isinstance(v, bool))
    if path is not None:
        raise BadQueryError(f"{path} is {_kind(value)}; expected a number", field=path)
    try:
        return np.asarray(q, dtype=np.float64)  # integers beyond int64: Python ints numpy kept as objects
    except (ValueError, TypeError, OverflowError):
        raise BadQueryError(f"{field} holds an integer too large for float32", field=field) from None


def _reject_bools(inputs: list) -> None:
    path, value = _first_leaf(inputs, "inputs", lambda v: isinstance(v, bool))
    if path is not None:
        raise BadQueryError(f"{path} is a boolean ({json.dumps(value)}); expected a number", field=path)


def _first_leaf(obj: list, root: str, bad: Callable[[Any], bool]) -> tuple[str | None, Any]:
    """Depth-first (iterative: no recursion limit) search for the first leaf for which ``bad`` holds."""
    stack: list[tuple[str, Any]] = [(root, obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif bad(value):
            return path, value
    return None, None


def _from_base64_objects(objs: list, qshape: tuple[int, ...], limits: HttpLimits, single: bool) -> np.ndarray:
    """One or more {"data", "shape"} objects -> (N, *qshape) float32, N summed over the objects."""
    parts, total = [], 0
    for k, obj in enumerate(objs):
        field = "inputs" if single else f"inputs[{k}]"
        if not isinstance(obj, dict):
            raise BadQueryError(f"{field} is {_kind(obj)}; inputs[0] is a base64 object, so every element must be "
                                'one: {"data": BASE64_FLOAT32_LE, "shape": [...]}', field=field)
        arr = _one_base64(obj, field, qshape, limits, already=total)
        def where(i: int, f: str = field, t: int = total) -> str:
            return f"{f}.data query {i} (query {t + i} of the request)"

        _check_finite(arr, where)
        total += arr.shape[0]
        parts.append(arr)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)  # K x (n_k, *qshape) -> (N, *qshape)


def _one_base64(obj: dict, field: str, qshape: tuple[int, ...], limits: HttpLimits, already: int) -> np.ndarray:
    unknown = sorted(set(obj) - _BASE64_KEYS)
    if unknown:
        raise BadQueryError(f"{field} has unknown key(s) {unknown}; a base64 object has exactly 'data' "
                            "(base64 of float32 little-endian) and 'shape'", field=field)
    data = obj.get("data")
    if not isinstance(data, str):
        raise BadQueryError(f"{field}.data is {_kind(data)}; expected a base64 string of float32 "
                            "little-endian values", field=f"{field}.data")
    shape = _shape_of(obj.get("shape"), f"{field}.shape")
    n = _queries_in(shape, qshape, f"{field}.shape")
    _check_count(already + n, limits)
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII characters
        raise BadQueryError(f"{field}.data is not valid base64 ({exc}); expected standard base64 "
                            "('+/' alphabet, '=' padding) of float32 little-endian bytes",
                            field=f"{field}.data") from None
    if len(raw) % 4:
        raise BadQueryError(f"{field}.data decodes to {len(raw)} bytes, not a multiple of 4; expected "
                            "float32 little-endian values (4 bytes each)", field=f"{field}.data")
    need = n * math.prod(qshape)
    if len(raw) // 4 != need:
        raise BadQueryError(f"{field}.data holds {len(raw) // 4} float32 values; shape {_fmt(shape)} needs "
                            f"{need}", field=f"{field}.data")
    # bytes -> (N, *qshape) little-endian float32 -> native, writable copy
    return np.frombuffer(raw, dtype="<f4").reshape(n, *qshape).astype(np.float32)


def _shape_of(shape: Any, field: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not shape or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise BadQueryError(f"{field} is {json.dumps(shape) if _jsonable(shape) else _kind(shape)}; "
                            "expected a non-empty list of non-negative integers", field=field)
    return tuple(shape)


def _queries_in(shape: tuple[int, ...], qshape: tuple[int, ...], field: str) -> int:
    """How many queries a base64 object's shape holds: 1 for qshape / [prod], N for [N, *qshape] / [N, prod]."""
    size = math.prod(qshape)
    if shape == qshape or shape == (size,):
        n = 1
    elif len(shape) >= 2 and shape[1:] in (qshape, (size,)):
        n = shape[0]
    else:
        raise BadQueryError(f"{field} is {_fmt(shape)}; expected {_fmt(qshape)}, [N, {_fmt(qshape)[1:-1]}], "
                            f"[{size}] or [N, {size}]", field=field)
    if n == 0:
        raise BadQueryError(f"{field} is {_fmt(shape)}: no queries; send at least one", field=field)
    return n


def _to_float32(arr: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # values beyond float32's range become inf, rejected by _check_finite
        return arr.astype(np.float32)


def _check_finite(arr: np.ndarray, name: Callable[[int], str]) -> None:
    flat = arr.reshape(arr.shape[0], -1)  # (N, *qshape) -> (N, size)
    ok = np.isfinite(flat)  # (N, size) bool
    if ok.all():
        return
    i = int(np.argmin(ok.all(axis=1)))
    j = int(np.argmin(ok[i]))
    raise BadQueryError(f"{name(i)} has a non-finite value ({flat[i, j]}) at flat index {j}; NaN, Infinity and "
                        "numbers beyond float32's range (about 3.4e38) are not accepted", field=name(i))


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (int, float, str, list))


# ------------------------------------------------------------------------------------------- ASGI app


class _HttpError(Exception):
    """A response decided at the edge (404, 405, 413, ...)."""

    def __init__(self, status: int, type_: str, message: str, headers: list | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers or []


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


_JSON_HEADERS = [(b"content-type", b"application/json")]
_RETRY_AFTER = (b"retry-after", b"1")
_CLOSE = (b"connection", b"close")




def _dumps(obj: Any) -> bytes:
    """JSON bytes via orjson (fast; a non-finite float, which answers never hold, would become null:
    the body stays valid JSON either way)."""
    return orjson.dumps(obj, default=str, option=orjson.OPT_SERIALIZE_NUMPY)


def _error_body(type_: str, message: str, **extra: Any) -> bytes:
    return _dumps({"error": {"type": type_, "message": message,
                             **{k: v for k, v in extra.items() if v is not None}}})


class _App:
    """The ASGI callable: routes, reads bodies within limits, maps errors to statuses."""

    def __init__(self, service: PredictService, metrics: ServingMetrics, limits: HttpLimits,
                 recorder: InputRecorder | None = None, tenant_header: str = "") -> None:
        self._recorder = recorder
        self._tenant_header = tenant_header.lower().encode("latin-1")
        self._service = service
        self._metrics = metrics
        self._limits = limits
        self._rejected_bad = metrics.rejected.labels(reason="bad_query")
        self._rejected_overload = metrics.rejected.labels(reason="overloaded")
        self._rejected_large = metrics.rejected.labels(reason="body_too_large")
        self._routes = {"/v1/predict": ("POST", self._predict),
                        "/healthz": ("GET", self._healthz),
                        "/metrics": ("GET", self._metrics_text)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await _lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            handler = self._route(scope)
            status, headers, body = await handler(scope, receive)
        except _ClientGone:
            return
        except Exception as exc:  # noqa: BLE001 - the edge: every error becomes a status, the server keeps serving
            status, headers, body = self._error_response(exc, scope)
        await _respond(send, status, headers, body)

    def _route(self, scope: Scope) -> Callable[[Scope, Receive], Awaitable[tuple[int, list, bytes]]]:
        route = self._routes.get(scope["path"])
        if route is None:
            raise _HttpError(404, "not_found", f"no route {scope['path']!r}; routes: POST /v1/predict, "
                             "GET /healthz, GET /metrics")
        method, handler = route
        got = scope["method"]
        if got != method and not (method == "GET" and got == "HEAD"):
            raise _HttpError(405, "method_not_allowed", f"{scope['path']} accepts {method}; got {got}",
                             [(b"allow", method.encode())])
        return handler

    def _error_response(self, exc: Exception, scope: Scope) -> tuple[int, list, bytes]:
        if isinstance(exc, _HttpError):
            return exc.status, _JSON_HEADERS + exc.headers, _error_body(exc.type, exc.message)
        if isinstance(exc, BadQueryError):
            return exc.status, _JSON_HEADERS, _error_body("bad_query", str(exc), field=exc.field)
        if isinstance(exc, OverloadedError):
            return exc.status, _JSON_HEADERS + [_RETRY_AFTER], _error_body("overloaded", str(exc), limit=exc.limit)
        if isinstance(exc, DeadlineExceededError):
            return 504, _JSON_HEADERS, _error_body("deadline_exceeded", str(exc), deadline_s=exc.deadline_s)
        if isinstance(exc, ModelFailedError):
            return exc.status, _JSON_HEADERS, _error_body(exc.kind, str(exc))
        logger.error("unhandled error serving %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
        return 500, _JSON_HEADERS, _error_body("internal", "internal server error; the server logged the details")

    # ------------------------------------------------------------------------------------- routes

    async def _predict(self, scope: Scope, receive: Receive) -> tuple[int, list, bytes]:
        overloaded = getattr(self._service, "overloaded", None)
        if overloaded is not None and overloaded():  # full: shed before reading or parsing the body (cheap)
            self._rejected_overload.inc()
            raise _HttpError(429, "overloaded", "the server holds as many pending queries as it may; retry later",
                             [_RETRY_AFTER, _CLOSE])
        tenant = self._tenant(scope) if self._tenant_header else None
        body = await self._read_body(scope, receive)
        n = 1
        try:
            queries = await self._parse(body)  # (N, *query_shape) float32
            n = queries.shape[0]
            if self._recorder is not None:
                self._recorder.offer(queries)
            predictions = await self._service.predict(queries, tenant=tenant)  # groups never mix tenants
        except BadQueryError:
            self._rejected_bad.inc(n)
            raise
        except OverloadedError:
            self._rejected_overload.inc(n)
            raise
        if len(predictions) != n:
            raise RuntimeError(f"service answered {len(predictions)} predictions for {n} queries")
        return 200, _JSON_HEADERS, _dumps({"outputs": [p.to_json() for p in predictions]})

    def _tenant(self, scope: Scope) -> str:
        """The request's tenant: the value of the tenant header ("" when absent)."""
        values = [v for k, v in scope["headers"] if k == self._tenant_header]
        if not values:
            return ""
        if len(values) > 1 or len(values[0]) > MAX_TENANT_BYTES:
            self._rejected_bad.inc()
            raise _HttpError(400, "bad_tenant", f"the {self._tenant_header.decode()} header names the tenant whose "
                             f"queries may be coded together: send it once, at most {MAX_TENANT_BYTES} bytes")
        return values[0].decode("latin-1")

    async def _parse(self, body: bytes) -> torch.Tensor:
        shape = tuple(self._service.query_shape)
        if len(body) > _OFFLOAD_BODY_BYTES:  # a big JSON parse would stall every query sharing this loop
            return await asyncio.to_thread(parse_queries, body, shape, self._limits)
        return parse_queries(body, shape, self._limits)

    async def _healthz(self, scope: Scope, receive: Receive) -> tuple[int, list, bytes]:
        health = self._service.health()
        if inspect.isawaitable(health):
            health = await health
        return (200 if health.get("serving", health.get("ok")) else 503), _JSON_HEADERS, _dumps(health)

    async def _metrics_text(self, scope: Scope, receive: Receive) -> tuple[int, list, bytes]:
        return 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], generate_latest(self._metrics.registry)

    # ------------------------------------------------------------------------------------ bodies

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole request body; 413 as soon as it (or its declared Content-Length) passes the limit."""
        limit = self._limits.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            if declared <= DRAIN_BYTES:  # read it away first, so that a client still sending sees the 413
                await self._drain(receive)
            raise self._too_large(f"Content-Length {declared}")
        chunks, size = [], 0
        while True:
            message = await self._next(receive)
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    if message.get("more_body", False):
                        await self._drain(receive, size)
                    raise self._too_large(f"more than {limit} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _next(self, receive: Receive) -> Message:
        try:
            message = await asyncio.wait_for(receive(), self._limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise _HttpError(408, "body_timeout", f"the request body stalled for {self._limits.body_timeout_s:g} s "
                             "before it was complete", [_CLOSE]) from None
        if message["type"] == "http.disconnect":
            raise _ClientGone
        return message

    async def _drain(self, receive: Receive, read: int = 0) -> None:
        """Read and drop the rest of a refused body, up to DRAIN_BYTES in all (then the 413 closes the
        connection): a client that writes its whole body before reading gets the 413, not a reset."""
        while read <= DRAIN_BYTES:
            message = await self._next(receive)
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    def _too_large(self, what: str) -> _HttpError:
        self._rejected_large.inc()
        return _HttpError(413, "body_too_large", f"request body is {what}; max_body_bytes is "
                          f"{self._limits.max_body_bytes}: send fewer queries per request", [_CLOSE])


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                raise _HttpError(400, "bad_request", f"Content-Length {value!r} is not an integer") from None
    return None


async def _respond(send: Send, status: int, headers: list, body: bytes) -> None:
    try:
        await send({"type": "http.response.start", "status": status,
                    "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    except OSError:  # the client went away; servers that raise on send after a disconnect
        logger.debug("client disconnected before the %d response was sent", status)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def make_app(service: PredictService, metrics: ServingMetrics, limits: HttpLimits = HttpLimits(), *,
             recorder: InputRecorder | None = None, tenant_header: str = "") -> ASGIApp:
    """The ASGI app serving ``service``: POST /v1/predict, GET /healthz, GET /metrics (see module
    docstring). With ``recorder``, a sample of the inputs of valid predict requests is recorded.
    With ``tenant_header``, each request's value of that header is passed to ``predict`` as its
    tenant (coding groups never mix tenants)."""
    return _App(service, metrics, limits, recorder, tenant_header)


# -------------------------------------------------------------------------------------------- server


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("serving HTTP needs uvicorn: pip install 'uvicorn>=0.30'") from exc
    return uvicorn


@functools.cache
def _guarded(base: type) -> type:
    """uvicorn's HTTP protocol ``base`` with a header deadline: a connection must complete each
    request's headers within ``header_timeout_s`` of its first byte (or of the connection opening),
    else it is closed. uvicorn itself waits forever for a half-sent request (slowloris)."""

    class Guarded(base):
        header_timeout_s = 10.0
        max_connections = 1000

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > self.max_connections:  # refuse before parsing anything
                self._parm_timer = None
                self._parm_cycle = None
                _refused()
                transport.write(_raw_response(503, "too_many_connections", f"more than {self.max_connections} "
                                              "open connections; retry later", retry_after=True))
                transport.close()
                return
            self._parm_arm()

        def send_400_response(self, msg: str) -> None:  # uvicorn's is text/plain: every body here is JSON
            self.transport.write(_raw_response(400, "bad_request", f"{msg} (malformed HTTP: framing, headers or "
                                               "chunk encoding)"))
            self.transport.close()

        def _parm_arm(self) -> None:
            self._parm_cycle = self.cycle
            self._parm_head_bytes = 0
            self._parm_tail = b""
            self._parm_timer = self.loop.call_later(self.header_timeout_s, self._parm_expired)

        def _parm_expired(self) -> None:
            self._parm_timer = None
            if self.cycle is self._parm_cycle and not self.transport.is_closing():  # no new request began
                logger.debug("closing a connection whose request headers did not arrive within %.0f s",
                             self.header_timeout_s)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            waiting = self.cycle is self._parm_cycle and (self.cycle is None or self.cycle.response_complete)
            if waiting:  # these bytes start with the rest of a request line and headers not yet complete
                seen = getattr(self, "_parm_head_bytes", 0)
                room = MAX_HEADER_BYTES - seen
                tail = getattr(self, "_parm_tail", b"")
                ends = (tail + data[:max(room, 0) + 4]).find(b"\r\n\r\n")  # the headers end within the limit
                self._parm_head_bytes = seen + len(data)
                self._parm_tail = data[-3:]
                if ends < 0 and self._parm_head_bytes > MAX_HEADER_BYTES:
                    self.transport.write(_raw_response(431, "headers_too_large", f"the request line and headers "
                                                       f"exceed {MAX_HEADER_BYTES} bytes"))
                    self.transport.close()
                    return
            super().data_received(data)
            timer = getattr(self, "_parm_timer", None)
            if self.cycle is not self._parm_cycle:  # headers complete: the app has the request
                if timer is not None:
                    timer.cancel()
                    self._parm_timer = None
                self._parm_cycle = self.cycle
                self._parm_head_bytes, self._parm_tail = 0, b""  # the next request's headers count afresh
            elif timer is None and not self.transport.is_closing() and (
                    self.cycle is None or self.cycle.response_complete):  # bytes of a new request: its deadline starts
                self._parm_arm()

        def connection_lost(self, exc: Exception | None) -> None:
            timer = getattr(self, "_parm_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded


def _raw_response(status: int, type_: str, message: str, *, retry_after: bool = False) -> bytes:
    """A whole HTTP/1.1 response with a JSON error body that closes the connection (written to a
    transport directly, outside any ASGI cycle)."""
    body = _error_body(type_, message)
    reason = {400: b"Bad Request", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}[status]
    return b"".join([b"HTTP/1.1 %d " % status, reason, b"\r\ncontent-type: application/json\r\n",
                     b"retry-after: 1\r\n" if retry_after else b"", b"content-length: %d\r\n" % len(body),
                     b"connection: close\r\n\r\n", body])


class _Throttle:
    """Lets each key through at most once per ``every_s``; ``allow`` returns how many times it was
    held back since it last went through (None: hold this one back). Every log line an attacker can
    trigger at will goes through one, so none can fill the disk."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._last: dict[str, tuple[float, int]] = {}

    def allow(self, key: str) -> int | None:
        now = time.monotonic()
        last, held = self._last.get(key, (-math.inf, 0))
        if now - last < self.every_s:
            self._last[key] = (last, held + 1)
            return None
        self._last[key] = (now, 0)
        return held


_REFUSALS = _Throttle()  # connections refused over the limit: one warning per 10 s with a count


def _refused() -> None:
    held = _REFUSALS.allow("refused")
    if held is not None:
        logger.warning("refused %d connection(s) over the connection limit (503) in the last %.0f s", held + 1,
                       _REFUSALS.every_s)


class _OncePer(logging.Filter):
    """A logging filter letting each distinct message through at most once per 10 s (uvicorn logs a
    warning per malformed request)."""

    def __init__(self) -> None:
        super().__init__()
        self.throttle = _Throttle()

    def filter(self, record: logging.LogRecord) -> bool:
        return self.throttle.allow(f"{record.name}:{record.msg}"[:120]) is not None


def _http_protocol(header_timeout_s: float, max_connections: int) -> type:
    """The fastest HTTP protocol uvicorn has here (httptools, else h11), with the header deadline
    and the connection limit."""
    base: type
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = HttpToolsProtocol
    except ImportError:  # httptools not installed
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base = H11Protocol
    guarded = _guarded(base)
    return type(guarded.__name__, (guarded,), {"header_timeout_s": header_timeout_s,
                                               "max_connections": max_connections})


class _RateLimitedLog:
    """The event loop's exception handler, but a repeated message (``accept()`` failing for want of
    file descriptors, thousands of times a second) is logged once per 10 s with a count."""

    def __init__(self) -> None:
        self.throttle = _Throttle()

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        key = str(context.get("message", ""))[:80]
        held = self.throttle.allow(key)
        if held is None:
            return
        exc = context.get("exception")
        logger.error("%s%s%s", key, f": {exc!r}" if exc else "",
                     f" ({held} more like it in the last {self.throttle.every_s:.0f} s)" if held else "")


@functools.cache
def _server_class() -> type:
    server_base: Any = _uvicorn().Server

    class _Server(server_base):
        """uvicorn's server, calling ``on_ready(host, port)`` once it listens."""

        def __init__(self, config: Any, on_ready: Callable[[str, int], None] | None) -> None:
            super().__init__(config)
            self._on_ready = on_ready
            self.ready_error: BaseException | None = None

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started and self._on_ready is not None:
                port = self.servers[0].sockets[0].getsockname()[1]
                try:
                    self._on_ready(self.config.host, port)
                except Exception as exc:  # noqa: BLE001 - re-raised by serve_http after a clean shutdown
                    self.ready_error = exc
                    self.should_exit = True

    return _Server


async def serve_http(app: ASGIApp, host: str = "127.0.0.1", port: int = 8000, *,
                     on_ready: Callable[[str, int], None] | None = None,
                     stop: asyncio.Event | None = None, limits: HttpLimits = HttpLimits()) -> None:
    """Serve ``app`` with uvicorn in the current event loop until ``stop`` is set (or a signal arrives).

    Port 0 picks a free port; ``on_ready(host, port)`` receives the bound one. uvicorn's logging
    configuration is left alone (its loggers propagate to the application's handlers). A port that
    cannot be bound raises that OSError; a failed lifespan startup raises RuntimeError.

    Connections (``limits``): headers must arrive within ``header_timeout_s``, an idle keep-alive
    connection closes after ``keep_alive_s``, a connection past ``max_connections`` open ones gets a
    503 and is closed before anything is parsed; uvicorn's own 400s get JSON bodies and its
    warnings are logged once per 10 s each;
    the process's open-file limit is raised to its hard limit, and the event loop's errors (such as
    ``accept()`` failing when descriptors run out anyway) are logged at most once per 10 s each.
    """
    _raise_open_files_limit()
    asyncio.get_running_loop().set_exception_handler(_RateLimitedLog())
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _OncePer) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_OncePer())
    config = _uvicorn().Config(app, host=host, port=port, log_level="warning", access_log=False,
                               lifespan="on", log_config=None, interface="asgi3",
                               http=_http_protocol(limits.header_timeout_s, limits.max_connections),
                               timeout_keep_alive=limits.keep_alive_s, proxy_headers=False, server_header=False)
    server = _server_class()(config, on_ready)
    watcher = asyncio.create_task(_exit_when_set(stop, server)) if stop is not None else None
    try:
        await server.serve()
    except SystemExit as exc:  # uvicorn exits the process when startup fails; a library must not
        if isinstance(exc.__context__, OSError):
            raise exc.__context__ from None
        raise RuntimeError(f"HTTP server on {host}:{port} failed to start (lifespan startup failed)") from None
    finally:
        if watcher is not None:
            watcher.cancel()
    if server.ready_error is not None:
        raise server.ready_error


def _raise_open_files_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit (often 1,024 of 1M): every
    connection and every instance's pipe takes descriptors."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # not POSIX, or not allowed: keep the limit
        pass


async def _exit_when_set(stop: asyncio.Event, server: Any) -> None:
    await stop.wait()
    server.should_exit = True
