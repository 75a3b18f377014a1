"""Serving configuration and the instance layout of each mode at equal cost."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

from parm.coding import CodeConfig
from parm.errors import ConfigError

MODES: tuple[str, ...] = ("none", "equal", "coded", "hedge", "replicate", "cheap")
DISPATCH: tuple[str, ...] = ("shared", "round_robin")


def instance_roles(mode: str, m: int, k: int) -> list[str]:
    """Roles of the instances a mode runs with m data instances and code parameter k.

    none: m. equal: m + ⌈m/k⌉ data instances (the paper's Equal-Resources). coded: m data +
    ⌈m/k⌉ parity. hedge: m + ⌈m/k⌉ data, late batches re-sent. replicate: 2m data, every batch
    sent twice. cheap: m data + ⌈m/k⌉ instances of a cheaper approximate model.
    """
    extra = math.ceil(m / k)
    layouts = {
        "none": ["data"] * m,
        "equal": ["data"] * (m + extra),
        "coded": ["data"] * m + ["parity"] * extra,
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
    encoder: str = "add"
    batch_size: int = 1
    batch_wait_ms: float = 1.0  # longest a query waits for its batch to fill
    group_wait_ms: float = 20.0  # longest an open coding group waits before being encoded with zeros
    max_in_flight: int = 2  # batches sent to one instance and not yet answered
    dispatch: str = "shared"  # shared pull queue, or per-instance round robin
    deadline_ms: float = 10_000.0  # a query with no answer by then fails (HTTP 504)
    stall_timeout_ms: float = 2_000.0  # an instance silent this long on a batch is killed and restarted
    hedge_percentile: float = 95.0  # hedge/cheap: a batch later than this percentile is re-sent
    hedge_min_ms: float = 2.0
    max_pending_queries: int = 10_000  # beyond this, new queries are refused (overload)

    def __post_init__(self) -> None:
        object.__setattr__(self, "query_shape", tuple(int(s) for s in self.query_shape))
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}", field="mode", value=self.mode)
        if self.dispatch not in DISPATCH:
            raise ConfigError(f"dispatch must be one of {DISPATCH}; got {self.dispatch!r}", field="dispatch",
                              value=self.dispatch)
        _ = self.code  # built once here (and cached): validates k and encoder together
        for name in ("batch_size", "max_in_flight", "max_pending_queries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}", field=name, value=getattr(self, name))
        for name in ("batch_wait_ms", "group_wait_ms", "deadline_ms", "stall_timeout_ms", "hedge_min_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)}", field=name, value=getattr(self, name))
        if not 0 < self.hedge_percentile < 100:
            raise ConfigError(f"hedge_percentile must be in (0, 100); got {self.hedge_percentile}",
                              field="hedge_percentile", value=self.hedge_percentile)

    @functools.cached_property
    def code(self) -> CodeConfig:
        """The code the frontend encodes and decodes with: k, r = 1 (one parity per group), encoder.
        Cached: a frozen dataclass without slots keeps it in the instance dict, outside the fields."""
        return CodeConfig(self.k, 1, self.encoder)

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name``: the one place serving defaults are stated (the CLI's help
        text and experiment files read it from here instead of repeating it)."""
        return cls.__dataclass_fields__[name].default

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
