"""Experiments as TOML files: what to serve, which modes, which load and faults, what to sweep.

```toml
name = "load"                       # a label for the output
modes = ["none", "equal", "coded"]
[system]                            # parm bench: the real system on this machine
base = "runs/mnist-mlp/base"
parity = "runs/mnist-mlp/default/k2-add"     # one parity checkpoint, or [parities] k = path
instances = 2                       # m
batch_size = 1
emulated_ms = 5.0                   # emulated accelerator time per batch (a sleep in the worker)
[load]
queries = 3000
rate = 150                          # or rates = [100, 150, 200] to sweep
warmup = 200
trials = 5                          # each trial its own fault realisation (default 5)
seed = 0
spike = { at_s = 6.0, duration_s = 3.0, factor = 1.6 }   # optional: arrivals 1.6x faster for 3 s
[faults]                            # parm.faults TOML: seed, [[faults.fault]] tables
seed = 1
[[faults.fault]]
kind = "slow"; rate_hz = 0.1; duration_s = 1.0; factor = 20
[sweep]                             # optional: at most one of these lists
ks = [2, 3, 4]                      # needs [parities] with a checkpoint per k
batch_sizes = [1, 2, 4]
slow_rates_hz = [0.05, 0.1, 0.2]    # scales the background-load fault
reconstruct_percentiles = ["off", 90, 99]  # coded modes' reconstruct_percentile ("off": eager)
[simulate]                          # parm simulate: same file, simulated instances
modes = ["equal", "coded", "hedge"] # optional: the modes to simulate (default: the file's)
instances = 12
queries = 100000
rates = [150, 210, 270, 330, 390]
trials = 3
[simulate.service]
kind = "lognormal"; median_ms = 20.0; sigma = 0.1
```

[system] takes the serving settings by their :class:`~parm.serving.ServingConfig` field names
(``deadline_ms``, ``batch_wait_ms``, ``dispatch``, …) and the :class:`~parm.system.SystemSpec`
fields above; [simulate] takes the serving settings too (but k and the batch size, which come from
[system] and [sweep]). A key not given is the dataclass default (k: the parity checkpoint's); the
simulator's own deadline, stall timeout and overload limit are in :mod:`parm.bench.simulate`. An
unknown key is an error naming it, the file and the valid keys.

Paths are relative to the current directory. Every run writes the resolved experiment next to
its results.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parm.bench.loadgen import Spike
from parm.errors import ConfigError
from parm.faults import FaultSpec, fault_spec_from_dict
from parm.faults.spec import SlowEpisodes
from parm.serving.config import MODES, ServingConfig
from parm.system import SERVING_KEYS, SYSTEM_KEYS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef,unused-ignore]

SWEEPS = ("rates", "ks", "batch_sizes", "slow_rates_hz", "reconstruct_percentiles")
# [system]: the serving settings and the system's own (both read from their dataclasses), one parity
# checkpoint per k, and the data folder; the backend is chosen on the command line.
SYSTEM_SECTION_KEYS = frozenset(SERVING_KEYS | (SYSTEM_KEYS - {"backend", "ray_address"}) | {"parities", "data_root"})
# [simulate]: the simulated cluster and its load, and serving settings (k and the batch size come from
# [system] and [sweep], shared with the real run).
SIM_SERVING_KEYS = frozenset(SERVING_KEYS - {"k", "batch_size"})
SECTION_KEYS = {
    "system": SYSTEM_SECTION_KEYS,
    "load": frozenset({"rate", "rates", "queries", "warmup", "trials", "seed", "spike"}),
    "simulate": SIM_SERVING_KEYS | {"instances", "rate", "rates", "queries", "trials", "warmup", "service", "modes",
                                    "restart_s", "spike"},
    "sweep": frozenset(SWEEPS),
}


@dataclass(frozen=True)
class Point:
    """One point of a sweep: the value each swept knob takes."""

    rate: float
    k: int | None  # None: the parity checkpoint's k, else the serving default (resolved per run)
    batch_size: int
    faults: FaultSpec | None
    label: str
    settings: dict[str, Any] = field(default_factory=dict)  # serving settings this point sets (by field name)

    def to_json(self) -> dict[str, Any]:
        return {"rate": self.rate, "k": self.k, "batch_size": self.batch_size, "label": self.label,
                "faults": None if self.faults is None else self.faults.to_text(), "settings": self.settings}


@dataclass(frozen=True)
class Experiment:
    name: str
    modes: tuple[str, ...]
    system: dict[str, Any]
    load: dict[str, Any]
    faults: FaultSpec | None
    sweep: dict[str, list]
    simulate: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ConfigError(f"experiment {self.source}: unknown mode(s) {bad}; choose from {MODES}", field="modes",
                              value=bad)
        unknown = set(self.sweep) - set(SWEEPS)
        if unknown:
            raise ConfigError(f"experiment {self.source}: unknown sweep {sorted(unknown)}; choose one of {SWEEPS}",
                              field="sweep", value=sorted(unknown))
        bad = [m for m in self.simulate.get("modes", ()) if m not in MODES]
        if bad:
            raise ConfigError(f"experiment {self.source}: unknown mode(s) {bad} in [simulate] modes; choose from "
                              f"{MODES}", field="simulate.modes", value=bad)
        if len(self.sweep) > 1:
            raise ConfigError(f"experiment {self.source}: sweep one knob at a time; got {sorted(self.sweep)}",
                              field="sweep", value=sorted(self.sweep))

    def with_overrides(self, *, modes: list[str] | None = None, queries: int | None = None,
                       rate: float | None = None, trials: int | None = None, warmup: int | None = None,
                       seed: int | None = None, system: dict[str, Any] | None = None) -> Experiment:
        """The experiment with what the command line gave (None: not given). ``system``: [system]
        keys, checked like the file's."""
        load, sweep = dict(self.load), dict(self.sweep)
        for key, value in (("queries", queries), ("trials", trials), ("warmup", warmup), ("seed", seed)):
            if value is not None:
                load[key] = value
        if rate is not None:
            load["rate"] = rate
            load.pop("rates", None)
            sweep.pop("rates", None)
        given = {key: value for key, value in (system or {}).items() if value is not None}
        _check_keys(self.source, "system", given)
        return dataclasses.replace(self, modes=tuple(modes) if modes else self.modes, load=load, sweep=sweep,
                                   system={**self.system, **given})

    def spike(self, simulated: bool = False) -> Spike | None:
        """The load spike of ``[load] spike = {at_s, duration_s, factor}`` (``[simulate] spike`` for
        simulated runs, else the [load] one), or None."""
        table = (self.simulate.get("spike") if simulated else None) or self.load.get("spike")
        if table is None:
            return None
        if not isinstance(table, dict) or set(table) != {"at_s", "duration_s", "factor"}:
            raise ConfigError(f"experiment {self.source}: spike needs exactly at_s, duration_s and factor; got {table!r}",
                              field="load.spike", value=table)
        return Spike(float(table["at_s"]), float(table["duration_s"]), float(table["factor"]))

    def points(self, simulated: bool = False) -> list[Point]:
        """Every point of the sweep (one point when nothing is swept)."""
        load = {**self.load, **(self.simulate if simulated else {})}
        rates = [float(r) for r in (load.get("rates") or self.sweep.get("rates") or [load.get("rate", 100.0)])]
        if simulated and "rates" not in self.simulate and "rate" in self.simulate:
            rates = [float(self.simulate["rate"])]
        k = int(self.system["k"]) if "k" in self.system else None
        batch = int(self.system.get("batch_size", ServingConfig.default("batch_size")))
        if "ks" in self.sweep:
            return [Point(rates[0], int(v), batch, self.faults, f"k={v}") for v in self.sweep["ks"]]
        if "batch_sizes" in self.sweep:
            return [Point(rates[0], k, int(v), self.faults, f"B={v}") for v in self.sweep["batch_sizes"]]
        if "reconstruct_percentiles" in self.sweep:
            return [Point(rates[0], k, batch, self.faults, "eager" if v == "off" else f"recon>p{v:g}",
                          {"reconstruct_percentile": None if v == "off" else float(v)})
                    for v in self.sweep["reconstruct_percentiles"]]
        if "slow_rates_hz" in self.sweep:
            return [Point(rates[0], k, batch, _scale_slow(self.faults, float(v)), f"slow={v}Hz")
                    for v in self.sweep["slow_rates_hz"]]
        return [Point(r, k, batch, self.faults, f"{r:g}qps") for r in rates]

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["faults"] = None if self.faults is None else self.faults.to_json()
        return data


def _scale_slow(faults: FaultSpec | None, rate_hz: float) -> FaultSpec:
    """The same faults with every background-load episode rate set to ``rate_hz``."""
    if faults is None or not any(isinstance(f, SlowEpisodes) for f in faults.faults):
        raise ConfigError("sweep slow_rates_hz needs a 'slow' fault in [faults]", field="sweep", value=rate_hz)
    return dataclasses.replace(faults, faults=tuple(
        dataclasses.replace(f, rate_hz=rate_hz) if isinstance(f, SlowEpisodes) else f for f in faults.faults))


def _check_keys(source: str, section: str, keys: Any) -> None:
    """An unknown key is a ConfigError naming it, the file and the valid keys."""
    known = SECTION_KEYS[section]
    bad = sorted(set(keys) - known)
    if bad:
        raise ConfigError(f"{source}: unknown key(s) {bad} in [{section}]; valid: {sorted(known)}",
                          field=f"{section}.{bad[0]}", value=bad)


def demo_experiment() -> Experiment:
    """``parm demo``'s experiment, shipped in the package (the same file as experiments/demo.toml)."""
    with importlib.resources.as_file(importlib.resources.files("parm.bench") / "demo.toml") as path:
        return load_experiment(path)


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file; errors name the file and the field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"experiment file {path} does not exist", field="experiment", value=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", field="experiment", value=str(path)) from exc
    known = {"name", "modes", "system", "load", "faults", "sweep", "simulate", "description"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; known: {sorted(known)}",
                          field="experiment", value=sorted(unknown))
    for section in SECTION_KEYS:
        _check_keys(str(path), section, data.get(section, {}))
    faults = fault_spec_from_dict(data["faults"], source=str(path)) if data.get("faults") else None
    if "slow_rates_hz" in data.get("sweep", {}) and not (faults and any(isinstance(f, SlowEpisodes)
                                                                          for f in faults.faults)):
        raise ConfigError(f"{path}: [sweep] slow_rates_hz needs a 'slow' fault in [faults] to scale",
                          field="sweep.slow_rates_hz", value=data["sweep"]["slow_rates_hz"])
    return Experiment(
        name=str(data.get("name", path.stem)), modes=tuple(data.get("modes", ("none", "equal", "coded"))),
        system=dict(data.get("system", {})), load=dict(data.get("load", {})), faults=faults,
        sweep={k: list(v) for k, v in data.get("sweep", {}).items()}, simulate=dict(data.get("simulate", {})),
        source=str(path),
    )
