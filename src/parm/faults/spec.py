"""Fault specifications: what to inject, at which instance, when.

A :class:`FaultSpec` is a seed plus a tuple of faults. Each fault is a frozen dataclass
validated at construction (values are normalised: times and factors become ``float``,
instance lists become sorted tuples). Kinds and their keys (required keys first):

============  ===========================================================  ====================
kind          keys                                                          effect
============  ===========================================================  ====================
``slow``      ``rate_hz, duration_s, factor[, instances]``                  background-load episodes
``straggler`` ``instance, factor[, from_s=0]``                              one instance always slow
``delay``     ``mean_ms[, dist=exp, prob=1, instances]``                    random extra delay per batch
``crash``     ``instance, at_s``                                            the process exits at ``at_s``
``stall``     ``instance, at_s[, duration_s=forever]``                      alive but silent
``shuffle``   ``concurrent, duration_s, link_mbps[, instances]``            network background load
============  ===========================================================  ====================

An instance index names a *slot*: slots 0..m−1 are the m data instances every mode has; slots
m.. are the mode's extra instances (equal/hedge: extra data instances; coded: parity; cheap: the
backup model; replicate: the second m data instances). A slot's realisation depends only on
(seed, slot), so the same slot sees the same episodes in every mode; with a dispatcher that
treats instances of one role alike, which slot an all-instance fault hits does not favour a mode.
A ``shuffle`` draws its pairs once for all slots (the same draw whichever slot asks); without
``instances`` it draws among every instance of the run, so its realisation also depends on how
many instances the mode runs: name ``instances`` to give modes of different sizes the same draw.

:meth:`FaultSpec.for_trial` derives one independent realisation per benchmark trial.
:func:`fault_spec_from_dict` builds a spec from plain data (the shape :meth:`FaultSpec.to_json`
writes, or a TOML document with ``[[fault]]`` tables); values may be native or strings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any, ClassVar, cast

import numpy as np

from parm.errors import ConfigError

DISTS: tuple[str, ...] = ("exp", "const", "uniform")

# value types a key can have, used to coerce strings (grammar) and check natives (TOML/JSON)
_INT, _FLOAT, _STR, _INSTANCES, _OPT_FLOAT = "int", "float", "str", "instances", "float?"
_TYPE_WORDS = {
    _INT: "an integer",
    _FLOAT: "a number",
    _STR: "a string",
    _INSTANCES: "instance indices separated by '|'",
    _OPT_FLOAT: "a number or 'inf'",
}


# ---------------------------------------------------------------- value checks (raise ConfigError)


def _fail(kind: str, key: str, value: Any, rule: str) -> ConfigError:
    return ConfigError(f"{kind}: {key} must be {rule}; got {key}={value!r}", field=f"{kind}.{key}", value=value)


def _number(kind: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _fail(kind, key, value, "a number")
    return float(value)


def _finite_at_least(kind: str, key: str, value: Any, low: float, *, strict: bool = False) -> float:
    number = _number(kind, key, value)
    ok = number > low if strict else number >= low
    if not (ok and math.isfinite(number)):
        raise _fail(kind, key, value, f"a finite number {'>' if strict else '>='} {low:g}")
    return number


def _instance(kind: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(kind, key, value, "an instance index (integer >= 0)")
    return value


def _instances(kind: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise _fail(kind, "instances", value, "a list of instance indices")
    result = tuple(sorted({_instance(kind, "instances", item) for item in items}))
    if not result:
        raise _fail(kind, "instances", value, "a non-empty list of instance indices (omit it for all)")
    return result


# ---------------------------------------------------------------- the fault kinds


class _Fault:
    """Shared behaviour of the fault dataclasses (not a dataclass itself)."""

    KIND: ClassVar[str]
    KEY_TYPES: ClassVar[dict[str, str]]

    def applies_to(self, instance: int) -> bool:
        """Whether this fault acts on ``instance``."""
        if hasattr(self, "instance"):
            return self.instance == instance
        chosen = getattr(self, "instances", None)
        return chosen is None or instance in chosen

    def named_instances(self) -> tuple[int, ...]:
        """Instance indices this fault names explicitly (empty when it applies to all)."""
        if hasattr(self, "instance"):
            return (self.instance,)
        return tuple(getattr(self, "instances", None) or ())

    def to_json(self) -> dict[str, Any]:
        """Plain data: ``{"kind": ..., key: value, ...}``; keys left at None are omitted."""
        out: dict[str, Any] = {"kind": self.KIND}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_text(self) -> str:
        """This fault in the CLI grammar, e.g. ``crash:instance=1,at_s=5``."""
        pairs = [f"{k}={_format_value(v)}" for k, v in self.to_json().items() if k != "kind"]
        return f"{self.KIND}:{','.join(pairs)}"


def _format_value(value: Any) -> str:
    if isinstance(value, list):
        return "|".join(str(v) for v in value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    return str(value)


@dataclass(frozen=True)
class SlowEpisodes(_Fault):
    """Background-load episodes: on each chosen instance independently, episodes start as a
    Poisson process of ``rate_hz`` and last ``duration_s``; while one is active the service
    time is multiplied by ``factor``. Overlapping episodes of the same fault merge (the
    instance is either under this load or not)."""

    KIND: ClassVar[str] = "slow"
    KEY_TYPES: ClassVar[dict[str, str]] = {
        "rate_hz": _FLOAT, "duration_s": _FLOAT, "factor": _FLOAT, "instances": _INSTANCES,
    }

    rate_hz: float
    duration_s: float
    factor: float
    instances: tuple[int, ...] | None = None  # None: every instance

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate_hz", _finite_at_least("slow", "rate_hz", self.rate_hz, 0, strict=True))
        duration = _finite_at_least("slow", "duration_s", self.duration_s, 0, strict=True)
        object.__setattr__(self, "duration_s", duration)
        object.__setattr__(self, "factor", _finite_at_least("slow", "factor", self.factor, 1))
        object.__setattr__(self, "instances", _instances("slow", self.instances))


@dataclass(frozen=True)
class Straggler(_Fault):
    """A persistently slow instance: service time × ``factor`` from ``from_s`` on."""

    KIND: ClassVar[str] = "straggler"
    KEY_TYPES: ClassVar[dict[str, str]] = {"instance": _INT, "factor": _FLOAT, "from_s": _FLOAT}

    instance: int
    factor: float
    from_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "instance", _instance("straggler", "instance", self.instance))
        object.__setattr__(self, "factor", _finite_at_least("straggler", "factor", self.factor, 1))
        object.__setattr__(self, "from_s", _finite_at_least("straggler", "from_s", self.from_s, 0))


@dataclass(frozen=True)
class RandomDelay(_Fault):
    """Extra delay added to a batch with probability ``prob``; its length has mean ``mean_ms``
    and distribution ``dist``: ``exp`` (exponential), ``const`` (exactly the mean) or
    ``uniform`` (uniform on [0, 2·mean])."""

    KIND: ClassVar[str] = "delay"
    KEY_TYPES: ClassVar[dict[str, str]] = {
        "mean_ms": _FLOAT, "dist": _STR, "prob": _FLOAT, "instances": _INSTANCES,
    }

    mean_ms: float
    dist: str = "exp"
    prob: float = 1.0
    instances: tuple[int, ...] | None = None  # None: every instance

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean_ms", _finite_at_least("delay", "mean_ms", self.mean_ms, 0, strict=True))
        if self.dist not in DISTS:
            raise _fail("delay", "dist", self.dist, f"one of {', '.join(DISTS)}")
        prob = _finite_at_least("delay", "prob", self.prob, 0)
        if prob > 1:
            raise _fail("delay", "prob", self.prob, "a probability in [0, 1]")
        object.__setattr__(self, "prob", prob)
        object.__setattr__(self, "instances", _instances("delay", self.instances))


@dataclass(frozen=True)
class Crash(_Fault):
    """The instance's process exits at ``at_s`` (seconds since the run started)."""

    KIND: ClassVar[str] = "crash"
    KEY_TYPES: ClassVar[dict[str, str]] = {"instance": _INT, "at_s": _FLOAT}

    instance: int
    at_s: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "instance", _instance("crash", "instance", self.instance))
        object.__setattr__(self, "at_s", _finite_at_least("crash", "at_s", self.at_s, 0))


@dataclass(frozen=True)
class Stall(_Fault):
    """The instance stays alive but answers nothing from ``at_s`` for ``duration_s``
    (None or inf: forever)."""

    KIND: ClassVar[str] = "stall"
    KEY_TYPES: ClassVar[dict[str, str]] = {"instance": _INT, "at_s": _FLOAT, "duration_s": _OPT_FLOAT}

    instance: int
    at_s: float
    duration_s: float | None = None  # None: forever

    def __post_init__(self) -> None:
        object.__setattr__(self, "instance", _instance("stall", "instance", self.instance))
        object.__setattr__(self, "at_s", _finite_at_least("stall", "at_s", self.at_s, 0))
        if self.duration_s is not None:
            duration = _number("stall", "duration_s", self.duration_s)
            if duration <= 0:
                raise _fail("stall", "duration_s", self.duration_s, "> 0 seconds (or omitted: forever)")
            object.__setattr__(self, "duration_s", None if math.isinf(duration) else duration)

    @property
    def end_s(self) -> float:
        """When the stall ends (``inf`` for forever)."""
        return math.inf if self.duration_s is None else self.at_s + self.duration_s


@dataclass(frozen=True)
class Shuffle(_Fault):
    """Network-intensive background load (the ParM paper's: shuffles between instances).

    ``concurrent`` shuffles run at any moment; each lasts ``duration_s`` and moves data between
    a uniformly random pair of distinct instances drawn from ``instances`` (None: every instance
    of the run). A transfer to or from an instance that is in s shuffles shares its link of
    ``link_mbps`` megabits/s fairly with them, so it gets 1/(s+1) of the bandwidth."""

    KIND: ClassVar[str] = "shuffle"
    KEY_TYPES: ClassVar[dict[str, str]] = {
        "concurrent": _INT, "duration_s": _FLOAT, "link_mbps": _FLOAT, "instances": _INSTANCES,
    }

    concurrent: int
    duration_s: float
    link_mbps: float
    instances: tuple[int, ...] | None = None  # None: every instance of the run

    def __post_init__(self) -> None:
        if isinstance(self.concurrent, bool) or not isinstance(self.concurrent, int) or self.concurrent < 1:
            raise _fail("shuffle", "concurrent", self.concurrent, "an integer >= 1")
        duration = _finite_at_least("shuffle", "duration_s", self.duration_s, 0, strict=True)
        object.__setattr__(self, "duration_s", duration)
        object.__setattr__(self, "link_mbps", _finite_at_least("shuffle", "link_mbps", self.link_mbps, 0, strict=True))
        instances = _instances("shuffle", self.instances)
        if instances is not None and len(instances) < 2:
            rule = "a list of at least 2 instance indices (a shuffle needs a pair)"
            raise _fail("shuffle", "instances", self.instances, rule)
        object.__setattr__(self, "instances", instances)


Fault = SlowEpisodes | Straggler | RandomDelay | Crash | Stall | Shuffle
FAULT_KINDS: dict[str, type[_Fault]] = {
    cls.KIND: cls for cls in (SlowEpisodes, Straggler, RandomDelay, Crash, Stall, Shuffle)
}


# ---------------------------------------------------------------- the spec


def _check_seed(seed: Any, label: str = "fault spec") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(
            f"{label}: seed must be an integer in [0, 2**63); got seed={seed!r}", field="seed", value=seed
        )
    return seed


@dataclass(frozen=True)
class FaultSpec:
    """A seed and the faults to inject. Schedules built from it depend only on
    (this spec, the instance index, time since the run started) and, for a ``shuffle`` without
    ``instances``, the run's instance count."""

    faults: tuple[Fault, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        faults = tuple(self.faults)
        for fault in faults:
            if not isinstance(fault, tuple(FAULT_KINDS.values())):
                raise ConfigError(
                    f"faults must be SlowEpisodes/Straggler/RandomDelay/Crash/Stall/Shuffle; got {fault!r}",
                    field="faults", value=fault,
                )
        object.__setattr__(self, "faults", faults)
        object.__setattr__(self, "seed", _check_seed(self.seed))

    @classmethod
    def none(cls) -> FaultSpec:
        """No faults."""
        return cls()

    @property
    def empty(self) -> bool:
        """True when there is nothing to inject."""
        return not self.faults

    def for_trial(self, trial: int) -> FaultSpec:
        """The same faults with a seed derived from (seed, ``trial``): one fault realisation
        per benchmark trial. Every mode of one trial uses ``for_trial(trial)``, so the modes see
        the same realisation and different trials see independent ones. Deterministic; the
        derived seed is in [0, 2**63) and differs from ``self.seed`` (with overwhelming odds)."""
        if isinstance(trial, bool) or not isinstance(trial, (int, np.integer)) or trial < 0:
            raise ConfigError(f"trial must be an integer >= 0; got trial={trial!r}", field="trial", value=trial)
        state = np.random.SeedSequence([self.seed, int(trial)]).generate_state(2, np.uint64)  # (2,)
        return replace(self, seed=int(state[0] >> np.uint64(1)))

    def for_instance(self, instance: int) -> tuple[tuple[int, Fault], ...]:
        """``(position, fault)`` for the faults acting on ``instance``; position indexes ``faults``."""
        return tuple((pos, f) for pos, f in enumerate(self.faults) if f.applies_to(instance))

    def out_of_range(self, instances: int) -> tuple[Fault, ...]:
        """Faults naming an instance index >= ``instances`` (they would never act)."""
        return tuple(f for f in self.faults if any(i >= instances for i in f.named_instances()))

    def check_instances(self, instances: int) -> None:
        """Raise ConfigError when a fault names an instance a mode with ``instances`` lacks."""
        bad = self.out_of_range(instances)
        if bad:
            raise ConfigError(
                f"fault {bad[0].to_text()!r} names an instance outside 0..{instances - 1} "
                f"(this mode runs {instances} instances)",
                field="faults", value=bad[0].to_text(),
            )

    def to_json(self) -> dict[str, Any]:
        """``{"seed": int, "faults": [fault.to_json(), ...]}``; :func:`fault_spec_from_dict` reads it back."""
        return {"seed": self.seed, "faults": [f.to_json() for f in self.faults]}

    def to_text(self) -> str:
        """This spec in the CLI grammar; :func:`parm.faults.parse_fault_spec` reads it back."""
        items = [f.to_text() for f in self.faults]
        return ";".join(items + ([f"seed={self.seed}"] if self.seed or items else []))


# ---------------------------------------------------------------- from plain data


def _coerce_int(raw: Any) -> int:
    if isinstance(raw, str):
        return int(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise TypeError
    return raw


def _coerce_float(raw: Any) -> float:
    if isinstance(raw, str):
        return float(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise TypeError
    return float(raw)


def _coerce_instances(raw: Any) -> Any:
    if isinstance(raw, str):
        return [int(part.strip()) for part in raw.split("|")]
    if isinstance(raw, (int, list, tuple, set, frozenset)) and not isinstance(raw, bool):
        return raw  # element checks happen in the dataclass
    raise TypeError


def _coerce(type_tag: str, raw: Any) -> Any:
    """Turn a grammar string or a native TOML/JSON value into the key's type (TypeError/ValueError)."""
    if type_tag == _INT:
        return _coerce_int(raw)
    if type_tag == _FLOAT:
        return _coerce_float(raw)
    if type_tag == _OPT_FLOAT:
        return None if raw is None else _coerce_float(raw)
    if type_tag == _INSTANCES:
        return None if raw is None else _coerce_instances(raw)
    if not isinstance(raw, str):
        raise TypeError
    return raw.strip()


def _required_keys(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.default is MISSING]


def fault_from_params(kind: Any, params: Mapping[str, Any], label: str) -> Fault:
    """Build one fault of ``kind`` from ``params`` (strings or natives); errors start with ``label``."""
    cls = FAULT_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ConfigError(
            f"{label}: unknown kind {kind!r}; accepted: {', '.join(FAULT_KINDS)}", field="kind", value=kind
        )
    accepted = list(cls.KEY_TYPES)
    for key in params:
        if key not in cls.KEY_TYPES:
            raise ConfigError(
                f"{label}: unknown key {key!r} for {kind}; accepted: {', '.join(accepted)}",
                field=f"{kind}.{key}", value=params[key],
            )
    for key in _required_keys(cls):
        if key not in params:
            raise ConfigError(
                f"{label}: missing required key {key!r} for {kind}; required: {', '.join(_required_keys(cls))}",
                field=f"{kind}.{key}", value=None,
            )
    return _construct(cls, {key: _coerce_key(cls, key, raw, label) for key, raw in params.items()}, label)


def _coerce_key(cls: type[_Fault], key: str, raw: Any, label: str) -> Any:
    type_tag = cls.KEY_TYPES[key]
    try:
        return _coerce(type_tag, raw)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{label}: key {key!r} for {cls.KIND} must be {_TYPE_WORDS[type_tag]}; got {raw!r}",
            field=f"{cls.KIND}.{key}", value=raw,
        ) from None


def _construct(cls: type[_Fault], values: dict[str, Any], label: str) -> Fault:
    try:
        return cast(Fault, cls(**values))
    except ConfigError as err:
        raise ConfigError(f"{label}: {err}", field=err.field, value=err.value) from err


def _fault_list(data: Mapping[str, Any], source: str) -> list[Any]:
    if "fault" in data and "faults" in data:
        raise ConfigError(f"{source}: give either 'fault' or 'faults', not both", field="faults", value=None)
    entries = data.get("fault", data.get("faults", []))
    if not isinstance(entries, list):
        raise ConfigError(
            f"{source}: 'fault' must be a list of tables ([[fault]] in TOML); got {entries!r}",
            field="faults", value=entries,
        )
    return entries


def _fault_from_entry(entry: Any, number: int, source: str) -> Fault:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{source}: fault #{number} must be a table; got {entry!r}", field="faults", value=entry)
    kind = entry.get("kind")
    label = f"{source}: fault #{number} (kind={kind!r})"
    if kind is None:
        raise ConfigError(
            f"{label}: missing 'kind'; accepted: {', '.join(FAULT_KINDS)}", field="kind", value=None
        )
    return fault_from_params(kind, {k: v for k, v in entry.items() if k != "kind"}, label)


def fault_spec_from_dict(data: Mapping[str, Any], source: str = "fault spec") -> FaultSpec:
    """Build a spec from ``{"seed": N, "fault": [{"kind": ..., key: value}, ...]}``
    (``faults`` is accepted for ``fault``: the :meth:`FaultSpec.to_json` shape). Values may be
    native numbers/lists or grammar strings. Errors name ``source`` and the fault's number."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a table; got {data!r}", field="faults", value=data)
    unknown = sorted(set(data) - {"seed", "fault", "faults"})
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {unknown[0]!r}; accepted: seed, fault", field=unknown[0], value=data[unknown[0]]
        )
    faults = tuple(_fault_from_entry(e, n, source) for n, e in enumerate(_fault_list(data, source), start=1))
    return FaultSpec(faults=faults, seed=_check_seed(data.get("seed", 0), source))
