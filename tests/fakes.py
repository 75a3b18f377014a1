"""A fake Backend with knobs, for frontend tests: in-process, on the event loop, no processes or threads.

Each instance runs a real torch module (``parm.models.toy``: ``linear``, its exact parity model
``linear_parity``, ``constant``) on what it is sent and answers through
``loop.call_later(delay_s, on_result, ...)``. The delay of the n-th batch an instance receives
(n counts from 0, per instance, across restarts) is, in order of precedence: a scripted delay for
(instance, n), else the instance's base delay.

Knobs (all take effect for batches sent afterwards unless said otherwise):

- ``set_delay(i, s)``: base delay of instance i.
- ``script(i, n, s)``: delay of instance i's n-th batch.
- ``stall(i, persist=False)``: instance i keeps what it is sent and never answers (until it is
  crashed/killed; ``persist=True`` keeps the stall across restarts). ``unstall(i)``.
- ``crash(i)``: instance i fails now: its in-flight work is dropped, it turns unhealthy,
  ``on_failure`` is called, and after ``restart_s`` it is healthy again and ``on_ready`` is called.
- ``crash_on(i, n)``: crash instance i right after it receives its n-th batch.
- ``model_error(i, times=1)``: instance i answers its next ``times`` batches with an error string.
- ``serial = True``: each instance serves one batch at a time, in the order received (as a real
  worker process does), so a batch's time from send includes the batches ahead of it. By
  default in-flight batches are served in parallel, each after its own delay.
- ``honour_cancel = True``: ``cancel(i, work)`` (the Backend method) answers a batch the instance
  has not started (a stalled instance starts nothing) at once with the error "cancelled", as the
  Ray Serve backend does; a started batch still answers. By default a cancel is only recorded.
- ``kill(i, reason)`` (the Backend method, called by the frontend): recorded in ``kills`` and then
  handled like ``crash`` (on_failure comes on the next loop turn, as with a real process).

What it saw: ``sends`` (every ``Sent(instance, role, work_id, nth, inputs)``), ``kills``, ``cancels``,
``crashes``, ``answered`` (work ids answered), ``dropped`` (work ids lost in a crash).
``await until(predicate, timeout_s)`` waits, event-driven, until ``predicate()`` is true after
some backend event (a send, answer, crash or restart); it never polls on a timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from parm.backends.base import Backend, InstanceSpec, ModelRef, OnFailure, OnReady, OnResult

TOY = "parm.models.toy"
_GONE = object()


def data_ref(in_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> ModelRef:
    return ModelRef(factory=f"{TOY}:linear", kwargs={"in_shape": tuple(in_shape), "num_classes": num_classes,
                                                    "seed": seed})


def parity_ref(in_shape: tuple[int, ...], num_classes: int, k: int, seed: int = 0, parity_index: int = 0) -> ModelRef:
    return ModelRef(factory=f"{TOY}:linear_parity", kwargs={"in_shape": tuple(in_shape), "num_classes": num_classes,
                                                           "seed": seed, "k": k, "parity_index": parity_index})


def specs_for(roles: list[str], in_shape: tuple[int, ...], num_classes: int, k: int, *,
              cheap_seed: int = 7, spare_on_parity: bool = False) -> list[InstanceSpec]:
    """Instances for ``roles``: data -> linear, parity<i> -> its exact parity model i, cheap -> another linear."""
    refs = {"data": data_ref(in_shape, num_classes), "parity": parity_ref(in_shape, num_classes, k),
            "cheap": data_ref(in_shape, num_classes, seed=cheap_seed),
            **{f"parity{i}": parity_ref(in_shape, num_classes, k, parity_index=i) for i in range(1, 8)}}
    spare = data_ref(in_shape, num_classes) if spare_on_parity else None  # ServingConfig.holds_spare
    return [InstanceSpec(i, role, refs[role], spare=spare if role.startswith("parity") else None)
            for i, role in enumerate(roles)]


@dataclass(frozen=True)
class Sent:
    instance: int
    role: str
    work_id: int
    nth: int  # the instance's n-th batch (from 0)
    inputs: torch.Tensor  # (B, *S), a copy
    spare: bool = False  # run on the instance's spare model (a data batch on a parity instance)


@dataclass
class _Instance:
    spec: InstanceSpec
    model: nn.Module
    delay_s: float
    spare: nn.Module | None = None
    up: bool = True
    stalled: bool = False
    stall_persists: bool = False
    errors_left: int = 0
    received: int = 0
    busy_until_s: float = 0.0  # serial: when the batches already received are done
    in_flight: dict[int, asyncio.TimerHandle | None] = field(default_factory=dict)  # work -> answer timer


class FakeBackend(Backend):
    """In-process backend whose instances answer after scripted delays (see module docstring)."""

    def __init__(self, instances: list[InstanceSpec], *, delay_s: float = 0.001, restart_s: float = 0.005) -> None:
        self.instances = list(instances)
        self.restart_s = restart_s
        self._inst = {s.instance_id: _Instance(s, s.model.build(), delay_s, None if s.spare is None else s.spare.build())
                      for s in self.instances}
        self._script: dict[tuple[int, int], float] = {}
        self._crash_on: set[tuple[int, int]] = set()
        self.sends: list[Sent] = []
        self.kills: list[tuple[int, str]] = []
        self.cancels: list[tuple[int, int]] = []
        self.honour_cancel = False
        self.serial = False
        self.crashes: list[int] = []
        self.answered: list[int] = []
        self.dropped: list[int] = []
        self.started = False
        self.stopped = False
        self.sends_after_stop = 0
        self._changed: asyncio.Condition | None = None

    # ---- knobs --------------------------------------------------------------------------
    def set_delay(self, instance_id: int, delay_s: float) -> None:
        self._inst[instance_id].delay_s = delay_s

    def script(self, instance_id: int, nth: int, delay_s: float) -> None:
        self._script[(instance_id, nth)] = delay_s

    def stall(self, instance_id: int, *, persist: bool = False) -> None:
        inst = self._inst[instance_id]
        inst.stalled, inst.stall_persists = True, persist

    def unstall(self, instance_id: int) -> None:
        self._inst[instance_id].stalled = False

    def model_error(self, instance_id: int, times: int = 1) -> None:
        self._inst[instance_id].errors_left += times

    def crash_on(self, instance_id: int, nth: int) -> None:
        self._crash_on.add((instance_id, nth))

    def crash(self, instance_id: int, reason: str = "crashed by the test") -> None:
        inst = self._inst[instance_id]
        if not inst.up or self.stopped:
            return
        inst.up = False
        self.crashes.append(instance_id)
        for work_id, handle in inst.in_flight.items():
            if handle is not None:
                handle.cancel()
            self.dropped.append(work_id)
        inst.in_flight.clear()
        inst.busy_until_s = 0.0
        if not inst.stall_persists:
            inst.stalled = False
        self._on_failure(instance_id, reason)
        self._loop.call_later(self.restart_s, self._restart, instance_id)
        self._notify()

    # ---- what it saw --------------------------------------------------------------------
    def sends_to(self, role: str) -> list[Sent]:
        return [s for s in self.sends if s.role == role]

    def sends_of(self, query: torch.Tensor, role: str = "data") -> list[Sent]:
        """Sends of role ``role`` whose batch holds ``query`` (*S) as one of its rows."""
        return [s for s in self.sends_to(role) if any(torch.equal(row, query) for row in s.inputs)]

    def received(self, instance_id: int) -> int:
        """How many batches instance i has received so far (the next one is its n-th, n = this)."""
        return self._inst[instance_id].received

    def in_flight(self, instance_id: int) -> int:
        return len(self._inst[instance_id].in_flight)

    def model(self, instance_id: int) -> nn.Module:
        return self._inst[instance_id].model

    async def until(self, predicate: Callable[[], bool], timeout_s: float = 2.0) -> None:
        """Wait until ``predicate()`` holds after some backend event (TimeoutError past timeout_s)."""
        assert self._changed is not None, "start the backend first"

        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)

        await asyncio.wait_for(wait(), timeout_s)

    def _notify(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        if self._changed is not None and not self.stopped:
            self._loop.create_task(notify())

    # ---- Backend ------------------------------------------------------------------------
    async def start(self, on_result: OnResult, on_failure: OnFailure, on_ready: OnReady) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_result, self._on_failure, self._on_ready = on_result, on_failure, on_ready
        self._changed = asyncio.Condition()
        self.started = True

    def send(self, instance_id: int, work_id: int, inputs: torch.Tensor, *, spare: bool = False) -> None:
        if self.stopped:
            self.sends_after_stop += 1
            return
        inst = self._inst[instance_id]
        nth = inst.received
        inst.received += 1
        self.sends.append(Sent(instance_id, inst.spec.role, work_id, nth, inputs.detach().clone(), spare))
        self._notify()
        if not inst.up:
            self._loop.call_soon(self._on_result, instance_id, work_id, None, "instance is down")
            return
        if (instance_id, nth) in self._crash_on:
            inst.in_flight[work_id] = None
            self._loop.call_soon(self.crash, instance_id, f"scripted crash on batch {nth}")
            return
        if inst.stalled:
            inst.in_flight[work_id] = None
            return
        if inst.errors_left > 0:
            inst.errors_left -= 1
            output, error = None, f"scripted model error on instance {instance_id}"
        else:
            model = inst.spare if spare else inst.model
            assert model is not None, f"instance {instance_id} was sent spare work but holds no spare model"
            with torch.no_grad():
                output, error = model(inputs.detach().clone()), None  # (B, *S) -> (B, C)
        delay_s = self._script.get((instance_id, nth), inst.delay_s)
        if self.serial:  # queued behind what the instance already holds
            now = self._loop.time()
            inst.busy_until_s = max(now, inst.busy_until_s) + delay_s
            delay_s = inst.busy_until_s - now
        inst.in_flight[work_id] = self._loop.call_later(delay_s, self._answer, instance_id, work_id, output, error)

    def _answer(self, instance_id: int, work_id: int, output: torch.Tensor | None, error: str | None) -> None:
        inst = self._inst[instance_id]
        if inst.in_flight.pop(work_id, _GONE) is _GONE or self.stopped:
            return
        self.answered.append(work_id)
        self._on_result(instance_id, work_id, output, error)
        self._notify()

    def _restart(self, instance_id: int) -> None:
        if self.stopped:
            return
        self._inst[instance_id].up = True
        self._on_ready(instance_id)
        self._notify()

    def healthy(self, instance_id: int) -> bool:
        return self.started and not self.stopped and self._inst[instance_id].up

    def cancel(self, instance_id: int, work_id: int) -> None:
        self.cancels.append((instance_id, work_id))
        inst = self._inst[instance_id]
        if self.honour_cancel and work_id in inst.in_flight and inst.in_flight[work_id] is None:  # not started
            inst.in_flight[work_id] = self._loop.call_soon(self._answer, instance_id, work_id, None, "cancelled")

    def kill(self, instance_id: int, reason: str) -> None:
        self.kills.append((instance_id, reason))
        self._loop.call_soon(self.crash, instance_id, f"killed: {reason}")

    async def stop(self) -> None:
        self.stopped = True
        for inst in self._inst.values():
            for handle in inst.in_flight.values():
                if handle is not None:
                    handle.cancel()
            inst.in_flight.clear()
