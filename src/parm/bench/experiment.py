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
[faults]                            # parm.faults TOML: seed, [[faults.fault]] tables
seed = 1
[[faults.fault]]
kind = "slow"; rate_hz = 0.1; duration_s = 1.0; factor = 20
[sweep]                             # optional: at most one of these lists
ks = [2, 3, 4]                      # needs [parities] with a checkpoint per k
batch_sizes = [1, 2, 4]
slow_rates_hz = [0.05, 0.1, 0.2]    # scales the background-load fault
[simulate]                          # parm simulate: same file, simulated instances
modes = ["equal", "coded", "hedge"] # optional: the modes to simulate (default: the file's)
instances = 12
queries = 100000
rates = [150, 210, 270, 330, 390]
trials = 3
[simulate.service]
kind = "lognormal"; median_ms = 20.0; sigma = 0.1
```

Paths are relative to the current directory. Every run writes the resolved experiment next to
its results.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parm.errors import ConfigError
from parm.faults import FaultSpec, fault_spec_from_dict
from parm.faults.spec import SlowEpisodes
from parm.serving.config import MODES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

SWEEPS = ("rates", "ks", "batch_sizes", "slow_rates_hz")
SECTION_KEYS = {
    "system": {"base", "parity", "parities", "cheap", "instances", "k", "batch_size", "emulated_ms", "batch_wait_ms",
               "group_wait_ms", "stall_timeout_ms", "deadline_ms", "data_root", "dispatch"},
    "load": {"rate", "rates", "queries", "warmup", "trials", "seed"},
    "simulate": {"instances", "rate", "rates", "queries", "trials", "warmup", "service", "stall_timeout_ms", "modes",
                 "deadline_ms", "max_pending_queries", "dispatch", "restart_s"},
    "sweep": set(SWEEPS),
}


@dataclass(frozen=True)
class Point:
    """One point of a sweep: the value each swept knob takes."""

    rate: float
    k: int
    batch_size: int
    faults: FaultSpec | None
    label: str

    def to_json(self) -> dict[str, Any]:
        return {"rate": self.rate, "k": self.k, "batch_size": self.batch_size, "label": self.label,
                "faults": None if self.faults is None else self.faults.to_text()}


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
                       rate: float | None = None, trials: int | None = None) -> Experiment:
        load, sweep = dict(self.load), dict(self.sweep)
        if queries is not None:
            load["queries"] = queries
        if trials is not None:
            load["trials"] = trials
        if rate is not None:
            load["rate"] = rate
            load.pop("rates", None)
            sweep.pop("rates", None)
        return dataclasses.replace(self, modes=tuple(modes) if modes else self.modes, load=load, sweep=sweep)

    def points(self, simulated: bool = False) -> list[Point]:
        """Every point of the sweep (one point when nothing is swept)."""
        load = {**self.load, **(self.simulate if simulated else {})}
        rates = [float(r) for r in (load.get("rates") or self.sweep.get("rates") or [load.get("rate", 100.0)])]
        if simulated and "rates" not in self.simulate and "rate" in self.simulate:
            rates = [float(self.simulate["rate"])]
        k = int(self.system.get("k", 2))
        batch = int(self.system.get("batch_size", 1))
        if "ks" in self.sweep:
            return [Point(rates[0], int(v), batch, self.faults, f"k={v}") for v in self.sweep["ks"]]
        if "batch_sizes" in self.sweep:
            return [Point(rates[0], k, int(v), self.faults, f"B={v}") for v in self.sweep["batch_sizes"]]
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
    for section, keys in SECTION_KEYS.items():
        bad = set(data.get(section, {})) - keys
        if bad:
            raise ConfigError(f"{path}: unknown key(s) {sorted(bad)} in [{section}]; known: {sorted(keys)}",
                              field=f"{section}.{sorted(bad)[0]}", value=sorted(bad))
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
