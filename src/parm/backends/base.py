"""The Backend interface: how the frontend reaches model instances, whatever the transport.

A backend owns a fixed list of instances (``InstanceSpec``: id, role, model, failure domain).
The frontend ``send``s work to one instance at a time (at most a few in flight per instance,
which the frontend enforces) and learns about outcomes only through the callbacks it passes to
``start``: a result (or a model error) per work item, an instance's failure (its process died,
or the frontend ``kill``ed it after it stopped answering), and an instance becoming ready
again after a restart. All callbacks run on the frontend's event loop.
"""

from __future__ import annotations

import abc
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from parm.errors import ConfigError
from parm.faults import InstanceFaults

ROLES: tuple[str, ...] = ("data", "parity", "cheap")

OnResult = Callable[[int, int, "torch.Tensor | None", "str | None"], None]  # instance, work, output, error
OnFailure = Callable[[int, str], None]  # instance, reason
OnReady = Callable[[int], None]  # instance


@dataclass(frozen=True)
class ModelRef:
    """What an instance runs: a checkpoint folder, or ``module:function(**kwargs)`` (tests, benchmarks)."""

    checkpoint: str | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.factory is None):
            raise ConfigError("ModelRef needs exactly one of checkpoint= or factory=", field="model", value=self)

    def build(self) -> nn.Module:
        if self.checkpoint is not None:
            from parm.checkpoint import load_checkpoint

            return load_checkpoint(self.checkpoint)[0]
        module_name, _, attr = str(self.factory).partition(":")
        return getattr(importlib.import_module(module_name), attr)(**self.kwargs).eval()


@dataclass(frozen=True)
class InstanceSpec:
    """One model instance: its id (position in the backend's list), role, model and injected faults.

    ``zone`` labels the instance's failure domain (a node, rack or zone: what fails together) for
    the dispatcher's placement of coding groups (see :mod:`parm.serving.dispatch`); it changes
    nothing about how the instance runs. None: a domain of its own, shared with no other instance.

    ``spare`` is a second model the instance also holds (mode coded-hedge gives parity instances
    the deployed model): work sent with ``spare=True`` runs on it instead of ``model``.

    ``device`` is the torch device its models run on (``cpu``, ``cuda:N``, ``mps``; ``cuda`` on a
    Ray replica: the GPU Ray gave it) and ``precision`` the autocast type of their forward passes
    (:mod:`parm.devices`); answers travel as float32 whatever either is.
    """

    instance_id: int
    role: str
    model: ModelRef
    emulated_ms: float = 0.0  # extra service time per batch, emulating an accelerator (documented as such)
    faults: InstanceFaults | None = None  # this instance's fault schedule (built by the system wiring)
    zone: str | None = None  # failure-domain label (node, rack, zone); None: the instance alone
    spare: ModelRef | None = None  # a second model it also runs (work sent with spare=True)
    device: str = "cpu"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        from parm.devices import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}; got {self.precision!r}", field="precision",
                              value=self.precision)
        if self.role not in ROLES and not re.fullmatch(r"parity[1-9][0-9]*", self.role):
            raise ConfigError(f"instance role must be one of {ROLES} or parity<i> (parity model i of r); got "
                              f"{self.role!r}", field="role", value=self.role)


class Backend(abc.ABC):
    """Transport between the frontend and its model instances (see module docstring)."""

    instances: list[InstanceSpec]

    @abc.abstractmethod
    async def start(self, on_result: OnResult, on_failure: OnFailure, on_ready: OnReady) -> None:
        """Start every instance and return when all are ready to take work."""

    @abc.abstractmethod
    def send(self, instance_id: int, work_id: int, inputs: torch.Tensor, *, spare: bool = False) -> None:
        """Hand ``inputs`` (B, *S) to the instance, to run on its model (on its ``spare`` model with
        ``spare=True``); the outcome arrives through a callback."""

    @abc.abstractmethod
    def healthy(self, instance_id: int) -> bool:
        """True while the instance is up and accepting work."""

    def zone(self, instance_id: int) -> str | None:
        """The instance's failure domain as placement sees it: ``InstanceSpec.zone`` (a backend
        that learns where an instance runs, such as the node of a Ray replica, may say more)."""
        return self.instances[instance_id].zone

    @abc.abstractmethod
    def kill(self, instance_id: int, reason: str) -> None:
        """Stop the instance at once (it is restarted; on_failure reports the kill)."""

    def cancel(self, instance_id: int, work_id: int) -> None:  # noqa: B027 (optional: a no-op by default)
        """Best effort: the frontend no longer needs this in-flight work (its batch was answered
        otherwise). Its outcome may still arrive, or arrive as an error; either is ignored.
        Transports that cannot take back a sent request (the local pipes) do nothing."""

    def set_time_origin(self, t0_wall_s: float) -> None:  # noqa: B027 (optional: a no-op by default)
        """Fault schedules count time from this wall-clock instant (default: when start() began)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop every instance and release everything; no callback fires afterwards."""
