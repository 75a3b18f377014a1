"""Assemble a serving system from checkpoints: instance specs -> backend -> frontend (-> HTTP).

This is where concrete objects are wired together (with ``cli`` and ``bench``): the frontend
only knows the Backend interface, and the backend only knows model references.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable

from parm.backends import InstanceSpec, LocalBackend, ModelRef
from parm.backends.base import Backend
from parm.errors import CheckpointMismatchError, ConfigError
from parm.faults import FaultSpec
from parm.serving import Frontend, ServingConfig, ServingMetrics, instance_roles
from parm.training.checkpoint import ModelRecord, check_parity_matches, load_record

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class SystemSpec:
    """Everything needed to start one serving system.

    ``instances`` is m, the number of data instances the deployment needs; each mode adds its
    own extra instances at equal cost (see :func:`parm.serving.instance_roles`).
    """

    base: str
    instances: int
    serving: ServingConfig
    parity: str | None = None
    cheap: str | None = None
    faults: FaultSpec | None = None
    emulated_ms: float = 0.0
    backend: str = "local"  # "local" (processes on this machine) or "ray" (Ray Serve deployments)
    ray_address: str | None = None  # ray backend: a running cluster; None starts a local one

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise ConfigError(f"instances must be >= 1; got {self.instances}", field="instances", value=self.instances)
        if self.serving.mode == "coded" and self.parity is None:
            raise ConfigError("mode 'coded' needs a parity checkpoint (--parity)", field="parity", value=None)
        if self.serving.mode == "cheap" and self.cheap is None:
            raise ConfigError("mode 'cheap' needs an approximate model checkpoint (--cheap)", field="cheap", value=None)
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}; got {self.backend!r}", field="backend",
                              value=self.backend)
        if self.ray_address is not None and self.backend != "ray":
            raise ConfigError("ray_address (--ray-address) needs backend 'ray' (--backend ray)", field="ray_address",
                              value=self.ray_address)
        if self.emulated_ms < 0:
            raise ConfigError(f"emulated_ms must be >= 0; got {self.emulated_ms}", field="emulated_ms",
                              value=self.emulated_ms)

    def roles(self) -> list[str]:
        return instance_roles(self.serving.mode, self.instances, self.serving.k)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["faults"] = None if self.faults is None else self.faults.to_json()
        data["roles"] = self.roles()
        return data


def check_checkpoints(base: str, parity: str | None, cheap: str | None, k: int | None,
                      encoder: str | None) -> tuple[ModelRecord, ModelRecord | None]:
    """Records of the base and parity checkpoints, checked against each other and k/encoder."""
    base_record = load_record(base)
    parity_record = None
    if parity is not None:
        parity_record = load_record(parity)
        check_parity_matches(base_record, parity_record, k=k, encoder=encoder)
        if parity_record.r not in (None, 1):
            raise ConfigError(f"serving uses one parity per group; {parity} has r={parity_record.r}",
                              field="r", value=parity_record.r)
    if cheap is not None:
        cheap_record = load_record(cheap)
        for name in ("in_shape", "num_classes", "dataset"):
            if getattr(cheap_record, name) != getattr(base_record, name):
                raise CheckpointMismatchError(
                    f"approximate model {cheap} has {name}={getattr(cheap_record, name)!r} but the base model has "
                    f"{getattr(base_record, name)!r}", field=name, expected=getattr(base_record, name),
                    got=getattr(cheap_record, name))
    return base_record, parity_record


def instance_specs(spec: SystemSpec) -> list[InstanceSpec]:
    """One InstanceSpec per role; the approximate model's emulated time is 1/k of the others'
    (it stands for a model k times cheaper)."""
    models = {"data": spec.base, "parity": spec.parity, "cheap": spec.cheap}
    emulated = {"data": spec.emulated_ms, "parity": spec.emulated_ms, "cheap": spec.emulated_ms / spec.serving.k}
    return [InstanceSpec(i, role, ModelRef(checkpoint=str(models[role])), emulated[role])
            for i, role in enumerate(spec.roles())]


def build_system(spec: SystemSpec, *, backend_factory: Callable[[list[InstanceSpec], FaultSpec | None], Backend]
                 | None = None, metrics: ServingMetrics | None = None) -> Frontend:
    """A frontend (not started) over a backend running the spec's instances."""
    specs = instance_specs(spec)
    if spec.faults is not None:
        spec.faults.check_instances(len(specs))
    backend = (backend_factory or default_backend_factory(spec))(specs, spec.faults)
    return Frontend(spec.serving, backend, metrics=metrics)


def default_backend_factory(spec: SystemSpec) -> Callable[[list[InstanceSpec], FaultSpec | None], Backend]:
    """The spec's backend: local processes, or Ray Serve (which needs the ``ray`` extra)."""
    if spec.backend == "local":
        return lambda specs, faults: LocalBackend(specs, faults=faults)
    try:
        from parm.backends.ray_serve import RayServeBackend
    except ImportError as exc:
        raise ConfigError(str(exc), field="backend", value="ray") from None
    return lambda specs, faults: RayServeBackend(specs, faults=faults, address=spec.ray_address)


async def run_server(spec: SystemSpec, host: str, port: int, *, on_ready: Callable[[str, int], None] | None = None,
                     stop: asyncio.Event | None = None, max_body_bytes: int | None = None) -> None:
    """Start the system and its HTTP API; serve until ``stop`` is set; then shut everything down."""
    from parm.http import HttpLimits, make_app, serve_http

    frontend = build_system(spec)
    await frontend.start()  # stops what it started if it fails
    try:
        limits = HttpLimits() if max_body_bytes is None else HttpLimits(max_body_bytes=max_body_bytes)
        app = make_app(frontend, frontend.metrics, limits)
        await serve_http(app, host, port, on_ready=on_ready, stop=stop)
    finally:
        await frontend.stop()  # deletes the Ray Serve deployments too
        if spec.backend == "ray":
            from parm.backends.ray_serve import shutdown_cluster

            shutdown_cluster()  # a local cluster we started; else just disconnect

