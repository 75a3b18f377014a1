"""Dispatching work to instances: queues per role, a few batches in flight per instance.

Work waits in the frontend, not in the instances: each instance holds at most
``max_in_flight`` batches, so a batch that is reconstructed while still queued can simply be
dropped before it is ever sent. With the default *shared* dispatch, all instances of a role
pull from one queue as they free up (a slow instance takes less work). With *round_robin*,
each batch is assigned to the next instance of its role and waits for that one.

Idle instances are offered work before partly busy ones, each group in the order the instances
became free (the longest idle first), which spreads load evenly. Picking from the shared queue, an instance never takes a second copy of a batch it already
holds (hedged or replicated copies go elsewhere), skips batches that must avoid it (a re-send
after it failed), and prefers a batch whose coding group has no other member on it, so that
one slow or dead instance rarely holds two members of a group.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from parm.backends.base import Backend

SCAN_LIMIT = 32
_ROLE_OF_KIND = {"data": "data", "parity": "parity", "cheap": "cheap"}  # queued items an idle instance looks at before settling for a fallback


@dataclass(eq=False)
class Work:
    """One batch (data, parity, cheap or probe) to run on one instance of ``role``."""

    work_id: int
    kind: str
    key: int  # batch id (data, cheap, probe) or group id (parity)
    role: str
    inputs: torch.Tensor  # (B, *S)
    group: int | None = None
    retry: bool = False
    avoid: frozenset[int] = frozenset()
    cancelled: bool = False
    instance: int | None = None
    sent_s: float | None = None
    target: int | None = None  # round robin: the instance this work waits for


@dataclass
class InstanceState:
    instance_id: int
    role: str
    in_flight: dict[int, Work] = field(default_factory=dict)
    last_progress_s: float = 0.0  # last answer, or the send that found it idle
    cancel_acked_s: float | None = None  # a cancelled batch came back unanswered; no answer since


class Dispatcher:
    """Queues and in-flight bookkeeping; sends through the backend (see module docstring).

    Costs do not grow with the number of instances: instances with a free slot are kept in a
    set per role, in-flight and queued work is indexed by (kind, key), and cancelling a queued
    copy only marks it (it is dropped when it reaches the head of the queue).
    """

    def __init__(self, backend: Backend, max_in_flight: int, dispatch: str, clock: Callable[[], float],
                 stall_timeout_s: float = float("inf")) -> None:
        self.backend = backend
        self.stall_timeout_s = stall_timeout_s
        self.max_in_flight = max_in_flight
        self.round_robin = dispatch == "round_robin"
        self.clock = clock
        self.instances = {s.instance_id: InstanceState(s.instance_id, s.role) for s in backend.instances}
        roles = sorted({s.role for s in backend.instances})
        self._queues: dict[str, deque[Work]] = {role: deque() for role in roles}
        self._own: dict[int, deque[Work]] = {i: deque() for i in self.instances}  # round robin: one queue each
        self._free: dict[str, dict[int, None]] = {role: {s.instance_id: None for s in backend.instances
                                                          if s.role == role} for role in roles}
        self._by_key: dict[tuple[str, int], list[Work]] = {}
        self._live: dict[str, int] = {role: 0 for role in roles}  # queued and not cancelled
        self._rr = {role: itertools.cycle([s.instance_id for s in backend.instances if s.role == role])
                    for role in roles}
        self._ids = itertools.count()

    def new_id(self) -> int:
        return next(self._ids)

    def has_role(self, role: str) -> bool:
        return role in self._queues

    def submit(self, work: Work, *, front: bool = False) -> None:
        if self.round_robin and work.target is None:
            work.target = self._next_target(work)
        queue = self._own[work.target] if self.round_robin else self._queues[work.role]
        queue.appendleft(work) if front else queue.append(work)
        self._by_key.setdefault((work.kind, work.key), []).append(work)
        self._live[work.role] += 1
        self.pump(work.role)

    def _next_target(self, work: Work) -> int:
        ids = [i for i, s in self.instances.items() if s.role == work.role]
        for _ in ids:
            candidate = next(self._rr[work.role])
            if candidate not in work.avoid and self.backend.healthy(candidate):
                return candidate
        return next(self._rr[work.role])

    def pump(self, role: str) -> None:
        """Send queued work of ``role`` to every healthy instance with a free slot."""
        if self.round_robin:
            self._pump_own(role)
            return
        queue = self._queues.get(role)
        if not queue:
            return
        # idle instances before partly busy ones; first only work whose group is not on the instance yet
        for spread_groups, idle_only in ((True, True), (True, False), (False, False)):
            for instance_id in list(self._free[role]):  # longest idle first; stops when the queue is empty
                if not queue:
                    return
                state = self.instances[instance_id]
                if (idle_only and state.in_flight) or not self.backend.healthy(instance_id):
                    continue
                self._fill(queue, state, spread_groups)

    def _pump_own(self, role: str) -> None:
        for instance_id in list(self._free.get(role, ())):
            queue = self._own[instance_id]
            if queue and self.backend.healthy(instance_id):
                self._fill(queue, self.instances[instance_id], spread_groups=False)

    def _fill(self, queue: deque[Work], state: InstanceState, spread_groups: bool) -> None:
        while queue and len(state.in_flight) < self.max_in_flight:
            work = self._pick(queue, state, spread_groups)
            if work is None:
                return
            self._send(state, work)

    def _pick(self, queue: deque[Work], state: InstanceState, spread_groups: bool) -> Work | None:
        while queue and queue[0].cancelled:  # lazily drop cancelled copies at the head
            self._forget(queue.popleft())
        held_batches = {(w.kind, w.key) for w in state.in_flight.values()}
        held_groups = {w.group for w in state.in_flight.values() if w.group is not None}
        for work in itertools.islice(queue, SCAN_LIMIT):
            if work.cancelled:
                continue
            if (work.kind, work.key) in held_batches or self._avoids(work, state):
                continue
            if not spread_groups or work.group is None or work.group not in held_groups:
                queue.remove(work)
                self._live[work.role] -= 1
                return work
        return None

    def _avoids(self, work: Work, state: InstanceState) -> bool:
        """``avoid`` is a preference: an avoided instance is used when no other healthy one exists."""
        if state.instance_id not in work.avoid:
            return False
        return any(s.role == state.role and s.instance_id not in work.avoid and self.backend.healthy(s.instance_id)
                   for s in self.instances.values())

    def _send(self, state: InstanceState, work: Work) -> None:
        work.instance, work.sent_s = state.instance_id, self.clock()
        if not state.in_flight and (state.cancel_acked_s is None
                                    or work.sent_s - state.cancel_acked_s > self.stall_timeout_s):
            state.last_progress_s, state.cancel_acked_s = work.sent_s, None  # it was idle: a fresh start
        state.in_flight[work.work_id] = work
        if len(state.in_flight) >= self.max_in_flight:
            self._free[state.role].pop(state.instance_id, None)
        self.backend.send(state.instance_id, work.work_id, work.inputs)

    def _forget(self, work: Work) -> None:
        works = self._by_key.get((work.kind, work.key))
        if works is not None:
            if work in works:
                works.remove(work)
            if not works:
                del self._by_key[(work.kind, work.key)]

    def _freed(self, state: InstanceState) -> None:
        free = self._free[state.role]
        if len(state.in_flight) < self.max_in_flight and state.instance_id not in free:
            free[state.instance_id] = None  # joins the end: instances idle longest are offered work first

    def take(self, instance_id: int, work_id: int, *, failed: bool = False) -> Work | None:
        """The in-flight work an instance just answered (None if unknown). ``failed``: it came
        back without an output. A cancelled batch that comes back that way (a backend that
        aborts cancelled work, as Ray Serve does) is no sign of life: it does not reset the
        instance's silence, so an instance whose batches are all reconstructed and cancelled
        while it stalls is still found stalled."""
        state = self.instances.get(instance_id)
        work = None if state is None else state.in_flight.pop(work_id, None)
        if work is not None:
            if work.cancelled and failed:
                state.cancel_acked_s = self.clock()
            else:
                state.last_progress_s, state.cancel_acked_s = self.clock(), None
            self._forget(work)
            self._freed(state)
        return work

    def drain(self, instance_id: int) -> list[Work]:
        """Everything in flight on a failed instance (it holds nothing afterwards)."""
        state = self.instances[instance_id]
        works, state.in_flight = list(state.in_flight.values()), {}
        for work in works:
            self._forget(work)
        self._freed(state)
        return works

    def cancel(self, kind: str, key: int, *, abort_sent: bool = True) -> int:
        """Drop queued copies of a batch and mark in-flight ones (ignored on return); with
        ``abort_sent`` the backend is also asked to cancel the in-flight ones. Returns how many
        queued copies were dropped."""
        dropped = 0
        for work in list(self._by_key.get((kind, key), ())):
            if not work.cancelled:
                work.cancelled = True
                if work.instance is None:
                    dropped += 1
                    self._live[work.role] -= 1
                elif abort_sent:
                    self.backend.cancel(work.instance, work.work_id)
        return dropped

    def holders(self, kind: str, key: int) -> set[int]:
        return {w.instance for w in self._by_key.get((kind, key), ())
                if w.instance is not None and not w.cancelled}

    def stalled(self, now_s: float, timeout_s: float) -> list[int]:
        """Instances holding work that have been silent for more than ``timeout_s``: no answer
        since then, and busy all along (a batch queued behind another in a slow but working
        instance does not count against it)."""
        return [s.instance_id for s in self.instances.values()
                if s.in_flight and now_s - s.last_progress_s > timeout_s]

    def depth(self, role: str) -> int:
        """Queued, not cancelled work of ``role``."""
        return self._live.get(role, 0)
