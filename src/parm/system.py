"""Assemble a serving system from checkpoints: instance specs -> backend -> frontend (-> HTTP).

This is where concrete objects are wired together (with ``cli`` and ``bench``): the frontend
only knows the Backend interface, and the backend only knows model references.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parm.backends import InstanceSpec, LocalBackend, ModelRef
from parm.backends.base import Backend
from parm.checkpoint import (
    ModelRecord,
    check_parity_matches,
    load_checkpoint,
    load_envelope,
    load_parity_set,
    load_record,
)
from parm.coding import InputEnvelope
from parm.devices import describe
from parm.errors import CheckpointMismatchError, ConfigError
from parm.faults import DEFAULT_HORIZON_S, FaultSpec, instance_schedules
from parm.serving import CODED_MODES, Frontend, ServingConfig, ServingMetrics, instance_roles, parity_role

if TYPE_CHECKING:
    from parm.http import HttpLimits
    from parm.serving.recorder import RecordSpec

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class SystemSpec:
    """Everything needed to start one serving system.

    ``instances`` is m, the number of data instances the deployment needs; each mode adds its
    own extra instances at equal cost (see :func:`parm.serving.instance_roles`). The field defaults
    here and in :class:`ServingConfig` are the only statement of each default; build a spec from
    what a user gave with :func:`resolve_system`.
    """

    base: str
    serving: ServingConfig
    instances: int = 4
    parity: str | None = None
    cheap: str | None = None
    faults: FaultSpec | None = None
    emulated_ms: float = 0.0
    backend: str = "local"  # "local" (processes on this machine) or "ray" (Ray Serve deployments)
    ray_address: str | None = None  # ray backend: a running cluster; None starts a local one
    zones: tuple[str, ...] | None = None  # failure domain of slot i: zones[i % len(zones)] (None: unknown)
    device: str = "auto"  # where instances run (parm.devices): auto, cpu, cuda (all GPUs), cuda:N, mps or a list
    precision: str = "fp32"  # instances' forward passes: fp32, bf16 or fp16 (autocast)
    gpus_per_instance: float | None = None  # ray backend: GPUs each replica reserves (a fraction shares a GPU)

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise ConfigError(f"instances must be >= 1; got {self.instances}", field="instances", value=self.instances)
        if self.serving.mode in CODED_MODES and self.parity is None:
            raise ConfigError(f"mode {self.serving.mode!r} needs a parity checkpoint (--parity)", field="parity",
                              value=None)
        if self.serving.mode == "cheap" and self.cheap is None:
            raise ConfigError("mode 'cheap' needs an approximate model checkpoint (--cheap)", field="cheap", value=None)
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}; got {self.backend!r}", field="backend",
                              value=self.backend)
        if self.ray_address is not None and self.backend != "ray":
            raise ConfigError("ray_address (--ray-address) needs backend 'ray' (--backend ray)", field="ray_address",
                              value=self.ray_address)
        if self.zones is not None:
            object.__setattr__(self, "zones", tuple(str(z) for z in self.zones))
        if self.emulated_ms < 0:
            raise ConfigError(f"emulated_ms must be >= 0; got {self.emulated_ms}", field="emulated_ms",
                              value=self.emulated_ms)
        if self.gpus_per_instance is not None:
            if self.backend != "ray":
                raise ConfigError("gpus_per_instance (--gpus-per-instance) is for the ray backend; the local backend "
                                  "spreads its instances over the GPUs --device names", field="gpus_per_instance",
                                  value=self.gpus_per_instance)
            if not self.gpus_per_instance >= 0:
                raise ConfigError(f"gpus_per_instance must be >= 0; got {self.gpus_per_instance}",
                                  field="gpus_per_instance", value=self.gpus_per_instance)
        self.instance_devices()  # an unknown or missing device, or a precision it cannot run, fails here

    def instance_devices(self) -> list[str]:
        """The device of each instance slot. Local backend: :func:`parm.devices.spread_devices` on this
        machine (``cuda``/``auto`` round robin over the visible GPUs), checked here so that a missing
        GPU fails before any process starts. Ray backend: the device is decided where the replica
        runs: ``cuda`` (the GPU Ray reserves for it) when ``device`` names CUDA, or is ``auto`` with
        ``gpus_per_instance`` > 0; else the CPU."""
        from parm.devices import check_precision, spread_devices

        count = len(self._layout)
        if self.backend == "ray":
            name = self.device.strip().lower()
            gpu = name.startswith("cuda") or (name == "auto" and bool(self.gpus_per_instance))
            devices = ["cuda" if gpu else ("cpu" if name == "auto" else name)] * count
        else:
            devices = spread_devices(self.device, count)
        for device in set(devices):
            check_precision(self.precision, device.split(":")[0])
        return devices
    @functools.cached_property
    def _layout(self) -> tuple[str, ...]:
        # computed once per spec (kept in the instance dict, outside the fields)
        return tuple(instance_roles(self.serving.mode, self.instances, self.serving.k, self.serving.r))

    def roles(self) -> list[str]:
        """The role of each instance slot (data slots first)."""
        return list(self._layout)

    def zone_of_slots(self) -> list[str | None]:
        """The failure-domain label of each instance slot (the ``zones`` list, cycled), or None each."""
        zones = self.zones
        return [None if not zones else zones[i % len(zones)] for i in range(len(self._layout))]

    def role_counts(self) -> dict[str, int]:
        """How many instances of each role, by role name (for summaries)."""
        return count_roles(self._layout)

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name`` (stated only here; help texts and experiment files read it)."""
        return cls.__dataclass_fields__[name].default

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["faults"] = None if self.faults is None else self.faults.to_json()
        data["roles"] = self.roles()
        data["devices"] = self.instance_devices()
        return data


def count_roles(roles: Sequence[str]) -> dict[str, int]:
    """How many instances of each role a layout has, by role name."""
    return {role: sum(r == role for r in roles) for role in sorted(set(roles))}


SERVING_KEYS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(ServingConfig)) - {"query_shape", "mode"}
"""ServingConfig fields a user sets (the query shape comes from the base checkpoint, the mode from the run)."""
SYSTEM_KEYS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(SystemSpec)) - {"serving", "faults"}
"""SystemSpec fields a user sets besides the serving settings and the faults."""
_COERCE: dict[str, Callable[[Any], Any]] = {"int": int, "float": float, "str": str, "float | None": float}


def serving_config(query_shape: Sequence[int], *, mode: str | None = None,
                   settings: Mapping[str, Any] | None = None) -> ServingConfig:
    """A ServingConfig from the settings a user gave; a setting that is None or absent takes its
    dataclass default, so no caller restates a default. Values are converted to the field's type
    (TOML and the command line give ints where floats are meant); an unknown name is a ConfigError
    listing the valid ones."""
    given: dict[str, Any] = {name: value for name, value in (settings or {}).items() if value is not None}
    unknown = sorted(set(given) - SERVING_KEYS)
    if unknown:
        raise ConfigError(f"unknown serving setting(s) {unknown}; valid: {sorted(SERVING_KEYS)}", field=unknown[0],
                          value=given[unknown[0]])
    fields = ServingConfig.__dataclass_fields__
    for name, value in given.items():
        convert = _COERCE.get(str(fields[name].type))
        if convert is not None and not isinstance(value, bool):
            try:
                given[name] = convert(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name} must be of type {fields[name].type}; got {value!r}", field=name,
                                  value=value) from None
    if mode is not None:
        given["mode"] = mode
    return ServingConfig(query_shape=tuple(query_shape), **given)


def resolve_system(base: str | Path, *, parity: str | Path | None = None, cheap: str | Path | None = None,
                   mode: str | None = None, serving: Mapping[str, Any] | None = None, instances: int | None = None,
                   faults: FaultSpec | None = None, emulated_ms: float | None = None, backend: str | None = None,
                   ray_address: str | None = None, zones: Sequence[str] | None = None, device: str | None = None,
                   precision: str | None = None, gpus_per_instance: float | None = None) -> SystemSpec:
    """The one place a serving system's configuration is resolved (``parm serve``, ``bench``, ``demo``).

    Every argument that is None was not given and takes its dataclass default (:class:`SystemSpec`,
    :class:`ServingConfig`); ``serving`` holds ServingConfig settings by field name. Each
    checkpoint record is read once and checked: the parity model against the base model it was
    trained for (and against k and the encoder where given) and for one parity per group; the
    approximate model's input shape, classes and dataset against the base model's. k and the
    encoder come from the parity checkpoint unless given; the query shape from the base checkpoint.
    """
    settings = {name: value for name, value in (serving or {}).items() if value is not None}
    base_record = load_record(base)
    if parity is not None:
        parity_set = load_parity_set(parity)  # one checkpoint (r = 1) or a folder of r, checked alike
        for _, parity_record in parity_set:
            check_parity_matches(base_record, parity_record, k=settings.get("k"), encoder=settings.get("encoder"))
        if settings.get("r", len(parity_set)) != len(parity_set):
            raise ConfigError(f"r={settings['r']} was asked but {parity} holds {len(parity_set)} parity model(s)",
                              field="r", value=settings["r"])
        settings["r"] = len(parity_set)
        for name in ("k", "encoder"):
            if name not in settings and getattr(parity_set[0][1], name) is not None:
                settings[name] = getattr(parity_set[0][1], name)
    if cheap is not None:
        _check_cheap(base_record, load_record(cheap), str(cheap))
    config = serving_config(base_record.in_shape, mode=mode, settings=settings)
    given: dict[str, Any] = {"instances": instances, "emulated_ms": emulated_ms, "backend": backend,
                             "ray_address": ray_address, "zones": None if zones is None else tuple(zones),
                             "device": device, "precision": precision,
                             "gpus_per_instance": None if gpus_per_instance is None else float(gpus_per_instance)}
    return SystemSpec(base=str(base), serving=config, parity=None if parity is None else str(parity),
                      cheap=None if cheap is None else str(cheap), faults=faults,
                      **{name: value for name, value in given.items() if value is not None})


def _check_cheap(base: ModelRecord, cheap: ModelRecord, path: str) -> None:
    """The approximate model must answer the same queries with the same classes as the base model."""
    for name in ("in_shape", "num_classes", "dataset"):
        if getattr(cheap, name) != getattr(base, name):
            raise CheckpointMismatchError(
                f"approximate model {path} has {name}={getattr(cheap, name)!r} but the base model has "
                f"{getattr(base, name)!r}", field=name, expected=getattr(base, name), got=getattr(cheap, name))


def instance_specs(spec: SystemSpec) -> list[InstanceSpec]:
    """One InstanceSpec per role, each with its own fault schedule; parity role i runs parity
    model i of the parity set (and, in mode coded-hedge, holds the deployed model as its spare);
    the approximate model's emulated time is 1/k of the others' (it stands for a model k times
    cheaper)."""
    models: dict[str, str | None] = {"data": spec.base, "cheap": spec.cheap}
    if spec.parity is not None and spec.serving.mode in CODED_MODES:
        models |= {parity_role(i): str(path) for i, (path, _) in enumerate(load_parity_set(spec.parity))}
    spare = ModelRef(checkpoint=spec.base)
    devices = spec.instance_devices()
    specs = [InstanceSpec(i, role, ModelRef(checkpoint=str(models[role])),
                          spec.emulated_ms / spec.serving.k if role == "cheap" else spec.emulated_ms, zone=zone,
                          spare=spare if spec.serving.holds_spare(role) else None, device=device,
                          precision=spec.precision)
             for i, (role, zone, device) in enumerate(zip(spec.roles(), spec.zone_of_slots(), devices))]
    log.info("instances on %s", describe(devices))
    if spec.faults is not None:
        spec.faults.check_instances(len(specs))
    return with_faults(specs, spec.faults)


def with_faults(specs: list[InstanceSpec], faults: FaultSpec | None,
                horizon_s: float = DEFAULT_HORIZON_S) -> list[InstanceSpec]:
    """``specs`` with instance i given its schedule under ``faults`` (built once, here: backends
    only run the schedule they are handed)."""
    schedules = instance_schedules(faults, len(specs), horizon_s)
    return [dataclasses.replace(s, faults=schedules[s.instance_id]) for s in specs]


def build_system(spec: SystemSpec, *, backend_factory: Callable[[list[InstanceSpec]], Backend] | None = None,
                 metrics: ServingMetrics | None = None) -> Frontend:
    """A frontend (not started) over a backend running the spec's instances."""
    specs = instance_specs(spec)
    check_checkpoints(specs)
    backend = (backend_factory or default_backend_factory(spec))(specs)
    return Frontend(spec.serving, backend, metrics=metrics, envelope=system_envelope(spec))


def check_checkpoints(specs: Sequence[InstanceSpec]) -> None:
    """Load every checkpoint the instances will run (record, weights hash, architecture) once,
    here, so that a broken one fails in seconds with one CheckpointError instead of a worker that
    dies at every restart."""
    folders = {ref.checkpoint for s in specs for ref in (s.model, s.spare) if ref is not None and ref.checkpoint}
    for folder in sorted(folders):
        load_checkpoint(folder)


def system_envelope(spec: SystemSpec) -> InputEnvelope | None:
    """The input envelope the frontend codes queries within: the first parity checkpoint's, in coded
    modes (None, with a warning, for a checkpoint trained before envelopes; None when
    ``input_envelope`` is ``off``)."""
    if spec.parity is None or spec.serving.mode not in CODED_MODES or spec.serving.input_envelope == "off":
        return None
    folder = load_parity_set(spec.parity)[0][0]
    envelope = load_envelope(folder, spec.serving.query_shape)
    if envelope is None:
        log.warning("%s has no input envelope (it was trained before ParM wrote one): every query is coded, so one "
                    "client's out-of-range inputs can spoil others' reconstructions; run the same parm train-parity "
                    "command again to add it", folder)
    return envelope


def default_backend_factory(spec: SystemSpec) -> Callable[[list[InstanceSpec]], Backend]:
    """The spec's backend: local processes, or Ray Serve (which needs the ``ray`` extra)."""
    if spec.backend == "local":
        return LocalBackend
    try:
        from parm.backends.ray_serve import RayServeBackend
    except ImportError as exc:
        raise ConfigError(str(exc), field="backend", value="ray") from None
    return lambda specs: RayServeBackend(specs, address=spec.ray_address, num_gpus=spec.gpus_per_instance)


async def run_server(spec: SystemSpec, host: str, port: int, *, on_ready: Callable[[str, int], None] | None = None,
                     stop: asyncio.Event | None = None, limits: HttpLimits | None = None,
                     record: RecordSpec | None = None) -> None:
    """Start the system and its HTTP API; serve until ``stop`` is set; then shut everything down.
    With ``record``, a sample of served inputs is written to files (:mod:`parm.serving.recorder`)."""
    from parm.http import make_app, serve_http
    from parm.serving.recorder import InputRecorder

    frontend = build_system(spec)
    await frontend.start()  # stops what it started if it fails
    recorder = InputRecorder(record) if record is not None else None
    try:
        limits = limits or HttpLimits()
        app = make_app(frontend, frontend.metrics, limits, recorder=recorder,
                       tenant_header=spec.serving.tenant_header)
        await serve_http(app, host, port, on_ready=on_ready, stop=stop, limits=limits)
    finally:
        if recorder is not None:
            recorder.close()
        await frontend.stop()  # deletes the Ray Serve deployments too
        if spec.backend == "ray":
            from parm.backends.ray_serve import shutdown_cluster

            shutdown_cluster()  # a local cluster we started; else just disconnect

