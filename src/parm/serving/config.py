"""Serving configuration and the instance layout of each mode at equal cost."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from typing import Any

from parm.coding import CodeConfig
from parm.errors import ConfigError

MODES: tuple[str, ...] = ("none", "equal", "coded", "coded-hedge", "hedge", "replicate", "cheap")
CODED_MODES: tuple[str, ...] = ("coded", "coded-hedge")
"""Modes that run parity instances (and need a parity checkpoint)."""
DISPATCH: tuple[str, ...] = ("shared", "round_robin")
ENVELOPE_ACTIONS: tuple[str, ...] = ("uncoded", "reject", "off")
BATCH_POLICIES: tuple[str, ...] = ("wait", "idle")
"""What coded modes do with a query outside the parity model's input envelope (parm.coding.envelope):
serve it outside every coding group, refuse it (422), or code it anyway (no check)."""

_HEADER_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


def parity_role(index: int) -> str:
    """The role of the instances running parity model ``index`` (0..r-1): ``parity``,
    ``parity1``, ``parity2``, …"""
    return "parity" if index == 0 else f"parity{index}"


def instance_roles(mode: str, m: int, k: int, r: int = 1) -> list[str]:
    """Roles of the instances a mode runs with m data instances and code parameters k and r.

    Every mode but none and replicate adds E = ⌈m·r/k⌉ instances (equal cost):
    none: m. equal: m + E data instances (the paper's Equal-Resources). coded and coded-hedge:
    m data + E parity, parity model i on instances i, i + r, … of them (so each of the r
    parity models has ⌊E/r⌋ or ⌈E/r⌉ instances; E >= r is required). hedge: m + E data, late
    batches re-sent. replicate: 2m data, every batch sent twice. cheap: m data + E instances of
    a cheaper approximate model.
    """
    extra = math.ceil(m * r / k)
    if mode in CODED_MODES and extra < r:
        raise ConfigError(f"r={r} parity models need at least {r} parity instances, but m={m} data instances with "
                          f"k={k} give only ⌈m·r/k⌉={extra}; use more data instances or a smaller r", field="r", value=r)
    parity = [parity_role(i % r) for i in range(extra)]
    layouts = {
        "none": ["data"] * m,
        "equal": ["data"] * (m + extra),
        "coded": ["data"] * m + parity,
        "coded-hedge": ["data"] * m + parity,
        "hedge": ["data"] * (m + extra),
        "replicate": ["data"] * (2 * m),
        "cheap": ["data"] * m + ["cheap"] * extra,
    }
    if mode not in layouts:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}", field="mode", value=mode)
    return layouts[mode]


@dataclass(frozen=True)
class ServingConfig:
    """How the frontend batches, codes, dispatches and times out. Times in milliseconds."""

    query_shape: tuple[int, ...]
    mode: str = "coded"
    k: int = 2
    r: int = 1  # parity batches per coding group (one parity model each)
    encoder: str = "add"
    batch_size: int = 1
    batch_wait_ms: float = 1.0  # longest a query waits for its batch to fill
    # "wait": a partial batch forms after batch_wait_ms; "idle" (dynamic batching): also at once when a
    # data instance is idle with nothing queued (see parm.serving.batcher), so at low load no query waits
    batch_policy: str = "wait"
    group_wait_ms: float = 20.0  # longest an open coding group waits before being encoded with zeros
    max_in_flight: int = 1  # batches sent to one instance and not yet answered (see dispatch.py)
    dispatch: str = "shared"  # shared pull queue, or per-instance round robin
    deadline_ms: float = 10_000.0  # a query with no answer by then fails (HTTP 504)
    stall_timeout_ms: float = 2_000.0  # an instance silent this long on a batch is killed and restarted
    hedge_percentile: float = 95.0  # hedge/cheap: a batch later than this percentile is re-sent
    hedge_min_ms: float = 2.0
    # coded modes: None accepts a reconstruction as soon as the group can decode it; a percentile p
    # accepts it only once the batch is older than the p-th percentile of recent original answer
    # times (or its instance failed), so a busy but healthy instance's answer is waited for.
    reconstruct_percentile: float | None = None
    # coded-hedge: the parity instances also hold the deployed model and run data batches (re-sends, and
    # originals while every data instance is full) before parity work; False: data work on data instances only
    hedge_on_parity: bool = True
    max_pending_queries: int = 10_000  # beyond this, new queries are refused (overload)
    # queries of one request in the batcher, queues and instances at once; the rest wait in the request
    # and enter as its answers come back, so a request of thousands of queries cannot fill the queue
    # ahead of everyone else's. 0: 2 × batch_size × data instances (every instance busy, one batch ready)
    request_window: int = 0
    # coded modes: a query outside the parity model's input envelope is served uncoded (outside every
    # coding group, so it cannot reach other queries' reconstructions), refused ("reject", 422) or,
    # with "off", coded like any other
    input_envelope: str = "uncoded"
    # coded modes: queries whose requests carry different values of this HTTP header (e.g. "x-api-key")
    # never share a batch or a coding group, so one tenant's inputs never reach another's answers; a
    # request without the header belongs to the tenant "". Empty: off (any queries are coded together).
    tenant_header: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "query_shape", tuple(int(s) for s in self.query_shape))
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}", field="mode", value=self.mode)
        if self.dispatch not in DISPATCH:
            raise ConfigError(f"dispatch must be one of {DISPATCH}; got {self.dispatch!r}", field="dispatch",
                              value=self.dispatch)
        _ = self.code  # built once here (and cached): validates k and encoder together
        if not isinstance(self.request_window, int) or self.request_window < 0:
            raise ConfigError(f"request_window must be an integer >= 0 (0: automatic); got {self.request_window!r}",
                              field="request_window", value=self.request_window)
        for name in ("batch_size", "max_in_flight", "max_pending_queries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}", field=name, value=getattr(self, name))
        for name in ("batch_wait_ms", "group_wait_ms", "deadline_ms", "stall_timeout_ms", "hedge_min_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)}", field=name, value=getattr(self, name))
        if self.batch_policy not in BATCH_POLICIES:
            raise ConfigError(f"batch_policy must be one of {BATCH_POLICIES}; got {self.batch_policy!r}",
                              field="batch_policy", value=self.batch_policy)
        if self.input_envelope not in ENVELOPE_ACTIONS:
            raise ConfigError(f"input_envelope must be one of {ENVELOPE_ACTIONS}; got {self.input_envelope!r}",
                              field="input_envelope", value=self.input_envelope)
        name = self.tenant_header
        if not isinstance(name, str) or (name and (name != name.strip().lower() or not _HEADER_NAME.fullmatch(name))):
            raise ConfigError(f"tenant_header must be an HTTP header name in lower case (letters, digits, '-'), e.g. "
                              f"'x-api-key'; got {name!r}", field="tenant_header", value=name)
        if not isinstance(self.hedge_on_parity, bool):
            raise ConfigError(f"hedge_on_parity must be true or false; got {self.hedge_on_parity!r}",
                              field="hedge_on_parity", value=self.hedge_on_parity)
        for name in ("hedge_percentile", "reconstruct_percentile"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 100:
                raise ConfigError(f"{name} must be in (0, 100); got {value}", field=name, value=value)

    @functools.cached_property
    def code(self) -> CodeConfig:
        """The code the frontend encodes and decodes with: k, r, encoder.
        Cached: a frozen dataclass without slots keeps it in the instance dict, outside the fields."""
        return CodeConfig(self.k, self.r, self.encoder)

    def holds_spare(self, role: str) -> bool:
        """Whether an instance of ``role`` also holds the deployed model (``InstanceSpec.spare``): the
        parity instances of coded-hedge, unless ``hedge_on_parity`` is off (see
        :mod:`parm.serving.dispatch`, spare capacity)."""
        return self.mode == "coded-hedge" and self.hedge_on_parity and role.startswith("parity")

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name``: the one place serving defaults are stated (the CLI's help
        text and experiment files read it from here instead of repeating it)."""
        return cls.__dataclass_fields__[name].default

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
