"""Dispatching work to instances: queues per role, a few batches in flight per instance.

Work waits in the frontend, not in the instances: each instance holds at most
``max_in_flight`` batches, so a batch that is reconstructed while still queued can simply be
dropped before it is ever sent. With the default *shared* dispatch, all instances of a role
pull from one queue as they free up (a slow instance takes less work). With *round_robin*
(the paper's dispatch), each batch is assigned to the next instance of its role and waits in
that instance's own queue.

Order (shared dispatch): an idle instance is always offered work before a busy one, and among
idle instances the one idle longest goes first; among busy instances, those holding fewer
batches go first (then the one that reached that count earliest). Each instance takes one
batch per turn, so two queued batches and two idle instances give each instance one batch,
never both to the same one. Picking from the shared queue, an instance never takes a second
copy of a batch it already holds (hedged or replicated copies go elsewhere), skips batches
that must avoid it (a re-send after it failed), and prefers a batch whose coding group has no
other member on it, so that one slow or dead instance rarely holds two members of a group.

Spare capacity (shared dispatch): an instance that also holds the deployed model as its spare
(``InstanceSpec.spare``: parity instances in mode coded-hedge) serves two queues, its own role's
and the data queue. Data instances are always offered data work first, so a data batch is
still queued only when every data instance is full. A spare instance with a free slot then
takes that data batch (a re-send first) before its own work, unless it is busy and has no
work of its own (then the batch waits for a data instance, which frees up as soon). Data
waiting means the data instances are short of capacity (several slow together): a parity
batch helps only a group whose other members are answered, while a waiting data batch delays
its own answer and, as a member, every group it belongs to; and a parity batch whose group is
answered while it waits is never run. Measured in the simulator (docs/EVALUATION.md), taking
the older of the two queues' first works instead left the data queue backed up for ~100 ms in
episodes where four data instances were slow at once.

Round robin never strands work: the queue of an instance that is down moves to live instances
of its role, and a queued re-send that must avoid its instance moves to another healthy one as
soon as one exists.

Placement of coding groups. For each recent coding group the dispatcher keeps a record of the
instances its data batches were sent to (with round robin: assigned to, from when they are
queued) and of their failure domains (``Backend.zone``, by default ``InstanceSpec.zone``; an
instance without a zone is a domain of its own, shared with no other instance). The record is kept for the
``group_memory`` groups placed most recently (the least recently placed is forgotten first), so
it stays bounded however long the server runs; a forgotten group is placed as if none of its
members had been sent (in-flight spreading still applies).

a. A data batch of a group does not go to an instance that holds another data batch of the
   same group still in service (shared dispatch; a member already answered does not count: its
   output is known and cannot be lost with the instance), or, with round robin, to an instance
   another member was assigned to.
b. A parity batch (every work of kind "parity", whatever its role) does not go to an instance
   whose failure domain is among the domains of its group's data batches sent so far. Without
   zones this never constrains anything: parity instances are never data instances.

Both rules are preferences, never a reason to wait, and shared dispatch stays work-conserving:
after every pump, no queued batch waits while an instance of its role that may run it (healthy,
with a free slot, not holding a copy of it, not to be avoided) exists — as before, an instance
looks at the first ``SCAN_LIMIT`` queued batches only. Each pump scans the free slots twice, in
the order above: first each instance is offered only work that keeps to a and b (and to the
spreading of in-flight groups), then everything it may take, so a batch that no free slot
could take in the first scan (fewer instances than k, the others down or full) goes to the
first free slot in the second, in the same pump. The price: a batch may go to a busy instance
with a free slot, behind another batch, while an idle instance that would break a or b stays
idle, unless other work comes for it.

Round robin chooses each batch's instance when it is queued: the first instance of the cycle
that is healthy, not avoided and keeps to a and b; else the first healthy one that is not
avoided; else the first healthy one; else simply the next one (it is re-homed when an instance
comes back). The cycle then moves on past the instance chosen. A re-homed batch is placed the
same way. Round robin is not work-conserving to begin with (a batch waits for its instance).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from parm.backends.base import Backend

SCAN_LIMIT = 32  # queued items an instance looks at before settling for a fallback
GROUP_MEMORY = 1024  # coding groups whose placement is remembered (the most recently placed)


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


@dataclass
class GroupPlaces:
    """Where a coding group's data batches were sent (or assigned): instances and failure domains."""

    instances: set[int] = field(default_factory=set)
    domains: set[str | int] = field(default_factory=set)  # a zone, or the instance id of one without


class Dispatcher:
    """Queues and in-flight bookkeeping; sends through the backend (see module docstring).

    Costs do not grow with the number of instances: instances are kept per role in one ordered
    set per in-flight count (``_levels[role][c]``: the instances holding c batches, in the order
    they reached c, so ``_levels[role][0]`` is the idle ones, longest idle first), in-flight and
    queued work is indexed by (kind, key), and cancelling a queued copy only marks it (it is
    dropped when it reaches the head of the queue). The placement record of coding groups holds
    at most ``group_memory`` groups. ``on_send`` (if set) is called with every work as it is sent.
    """

    def __init__(self, backend: Backend, max_in_flight: int, dispatch: str, clock: Callable[[], float],
                 stall_timeout_s: float = float("inf"), *, group_memory: int = GROUP_MEMORY) -> None:
        self.backend = backend
        self.stall_timeout_s = stall_timeout_s
        self.max_in_flight = max_in_flight
        self.round_robin = dispatch == "round_robin"
        self.clock = clock
        self.on_send: Callable[[Work], None] | None = None
        self.instances = {s.instance_id: InstanceState(s.instance_id, s.role) for s in backend.instances}
        roles = sorted({s.role for s in backend.instances})
        self._of_role = {role: [s.instance_id for s in backend.instances if s.role == role] for role in roles}
        self._queues: dict[str, deque[Work]] = {role: deque() for role in roles}
        self._own: dict[int, deque[Work]] = {i: deque() for i in self.instances}  # round robin: one queue each
        self._levels: dict[str, list[dict[int, None]]] = {
            role: [dict.fromkeys(ids)] + [{} for _ in range(max_in_flight - 1)] for role, ids in self._of_role.items()}
        self._by_key: dict[tuple[str, int], list[Work]] = {}
        self._live: dict[str, int] = {role: 0 for role in roles}  # queued and not cancelled
        self._rr = {role: 0 for role in roles}  # round robin: where the cycle of each role stands
        # shared dispatch: instances that also hold the deployed model (InstanceSpec.spare) and their roles
        self._spares = [] if self.round_robin else [s.instance_id for s in backend.instances if s.spare is not None]
        self._spare_roles = {self.instances[i].role for i in self._spares}
        self._spare_set = frozenset(self._spares)
        self.group_memory = max(1, group_memory)
        self._groups: OrderedDict[int, GroupPlaces] = OrderedDict()  # least recently placed first
        self._ids = itertools.count()

    def new_id(self) -> int:
        return next(self._ids)

    def has_role(self, role: str) -> bool:
        return role in self._queues

    def idle_order(self, role: str) -> list[int]:
        """Idle instances of ``role``, the one idle longest first (the next batch goes to it)."""
        return [i for i in self._levels[role][0] if self.backend.healthy(i)]

    def can_start(self, role: str) -> bool:
        """Whether a batch of ``role`` submitted now would start at once: nothing of ``role`` is
        queued and a healthy instance of ``role`` holds no batch (batch policy "idle")."""
        if self._live.get(role, 0):
            return False
        if self.round_robin:
            return any(not self.instances[i].in_flight and not self._own[i] and self.backend.healthy(i)
                       for i in self._of_role.get(role, ()))
        levels = self._levels.get(role)
        if not levels:
            return False
        return any(self.backend.healthy(i) for i in levels[0])

    def submit(self, work: Work, *, front: bool = False) -> None:
        if self.round_robin:
            if work.target is None:
                work.target = self._next_target(work)
                self._place(work, work.target)
            queue = self._own[work.target]
        else:
            queue = self._queues[work.role]
        queue.appendleft(work) if front else queue.append(work)
        self._by_key.setdefault((work.kind, work.key), []).append(work)
        self._live[work.role] += 1
        self.pump(work.role)

    def _next_target(self, work: Work, *, exclude: int | None = None) -> int:
        """Round robin: the first instance of the cycle that is healthy, not avoided and keeps the
        work's group apart; else the first healthy one not avoided; else the first healthy one;
        else simply the next one (it is re-homed when an instance comes back). The cycle moves on
        past the instance chosen."""
        ids = self._of_role[work.role]
        start = self._rr[work.role]
        best: tuple[int, int] | None = None  # (rank, offset in the cycle); rank 0 is the best
        for offset in range(len(ids)):
            candidate = ids[(start + offset) % len(ids)]
            if candidate == exclude or not self.backend.healthy(candidate):
                continue
            rank = 2 if candidate in work.avoid else 0 if self._apart(work, candidate) else 1
            if best is None or rank < best[0]:
                best = (rank, offset)
                if rank == 0:
                    break
        chosen = (start + (0 if best is None else best[1])) % len(ids)
        self._rr[work.role] = (chosen + 1) % len(ids)
        return ids[chosen]

    def _domain(self, instance_id: int) -> str | int:
        """The instance's failure domain: its zone, or the instance itself when it has none."""
        zone = self.backend.zone(instance_id)
        return instance_id if zone is None else zone

    def _apart(self, work: Work, instance_id: int, held_groups: frozenset[int] | set[int] = frozenset()) -> bool:
        """Whether ``instance_id`` keeps ``work``'s coding group apart (rules a and b of the module
        docstring; ``held_groups``: groups of the work the instance has in flight)."""
        if work.group is None:
            return True
        if work.group in held_groups:
            return False
        places = self._groups.get(work.group)
        if places is None:
            return True
        if work.kind == "data":  # shared dispatch: only members in service count (``held_groups``)
            return not self.round_robin or instance_id not in places.instances
        if work.kind == "parity":
            return self._domain(instance_id) not in places.domains
        return True

    def _place(self, work: Work, instance_id: int) -> None:
        """Record that a data batch of a coding group goes to ``instance_id`` (bounded: see class docstring)."""
        if work.kind != "data" or work.group is None:
            return
        places = self._groups.get(work.group)
        if places is None:
            places = self._groups[work.group] = GroupPlaces()
            if len(self._groups) > self.group_memory:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(work.group)
        places.instances.add(instance_id)
        places.domains.add(self._domain(instance_id))

    def placed(self, group: int) -> GroupPlaces | None:
        """Where the data batches of ``group`` were sent (None once forgotten, or before any)."""
        return self._groups.get(group)

    def pump(self, role: str) -> None:
        """Send queued work of ``role`` to healthy instances with a free slot (see module docstring)."""
        if self.round_robin:
            self._pump_own(role)
            return
        self._pump_shared(role)
        if self._spares and (role == "data" or role in self._spare_roles):
            self._pump_spares()

    def _pump_spares(self) -> None:
        """Spare capacity (module docstring): each instance holding the deployed model as its spare
        takes, while it has a free slot, a queued data batch (a re-send first) before the first
        work of its own role, and data work while busy only if it has no work of its own."""
        data_queue = self._queues.get("data")
        for instance_id in self._spares:
            state, own_queue = self.instances[instance_id], self._queues[self.instances[instance_id].role]
            while len(state.in_flight) < self.max_in_flight and self.backend.healthy(instance_id):
                own = self._find(own_queue, state, True) or self._find(own_queue, state, False)
                data = None if not data_queue else self._find(data_queue, state, True, strict=True) or \
                    self._find(data_queue, state, False, strict=True)
                if data is not None and not data.retry and own is None and state.in_flight:
                    data = None  # busy, with nothing of its own queued: the data instances' turn
                if data is None and own is None:
                    break
                self._take(data_queue if data is not None else own_queue, data or own)  # type: ignore[arg-type]
                self._send(state, data or own)  # type: ignore[arg-type]

    def _pump_shared(self, role: str) -> None:
        queue = self._queues.get(role)
        if not queue:
            return
        levels = self._levels[role]
        for spread_groups in (True, False):  # first only work that keeps its group apart (module docstring)
            for level in levels:  # idle instances first, then the least busy
                for instance_id in list(level):  # in the order they reached this level
                    if not queue:
                        return
                    if instance_id in level and instance_id not in self._spare_set and self.backend.healthy(instance_id):
                        work = self._pick(queue, self.instances[instance_id], spread_groups)
                        if work is not None:
                            self._send(self.instances[instance_id], work)

    def _pump_own(self, role: str) -> None:
        for instance_id in self._of_role.get(role, ()):
            self._rehome(instance_id)
        for instance_id in self._of_role.get(role, ()):
            queue = self._own[instance_id]
            state = self.instances[instance_id]
            while queue and len(state.in_flight) < self.max_in_flight and self.backend.healthy(instance_id):
                work = self._pick(queue, state, spread_groups=False)
                if work is None:
                    break
                self._send(state, work)

    def _rehome(self, instance_id: int) -> None:
        """Round robin: move work that cannot run on ``instance_id`` to another instance —
        all of it while the instance is down, and re-sends that must avoid it while another
        healthy instance exists."""
        queue = self._own[instance_id]
        if not queue:
            return
        down = not self.backend.healthy(instance_id)
        movable = list(queue) if down else [w for w in itertools.islice(queue, SCAN_LIMIT)
                                            if not w.cancelled and self._avoids(w, self.instances[instance_id])]
        for work in movable:
            target = self._next_target(work, exclude=instance_id)
            if target == instance_id or not self.backend.healthy(target):
                continue  # nowhere better to go yet
            queue.remove(work)
            work.target = target
            self._place(work, target)
            self._own[target].append(work)

    def _pick(self, queue: deque[Work], state: InstanceState, spread_groups: bool) -> Work | None:
        work = self._find(queue, state, spread_groups)
        if work is not None:
            self._take(queue, work)
        return work

    def _find(self, queue: deque[Work], state: InstanceState, spread_groups: bool, *, strict: bool = False
              ) -> Work | None:
        """The first queued work ``state``'s instance may take (``strict``: never an avoided one)."""
        while queue and queue[0].cancelled:  # lazily drop cancelled copies at the head
            self._forget(queue.popleft())
        held_batches = {(w.kind, w.key) for w in state.in_flight.values()}
        held_groups = {w.group for w in state.in_flight.values() if w.group is not None}
        for work in itertools.islice(queue, SCAN_LIMIT):
            if work.cancelled or (work.kind, work.key) in held_batches:
                continue
            if state.instance_id in work.avoid if strict else self._avoids(work, state):
                continue
            if not spread_groups or self._apart(work, state.instance_id, held_groups):
                return work
        return None

    def _take(self, queue: deque[Work], work: Work) -> None:
        queue.remove(work)
        self._live[work.role] -= 1

    def _avoids(self, work: Work, state: InstanceState) -> bool:
        """``avoid`` is a preference: an avoided instance is used when no other healthy one exists."""
        if state.instance_id not in work.avoid:
            return False
        return any(i not in work.avoid and self.backend.healthy(i) for i in self._of_role[state.role])

    def _move(self, state: InstanceState, before: int) -> None:
        """Keep ``_levels`` in step with the instance's in-flight count (it was ``before``)."""
        after = len(state.in_flight)
        if after == before:
            return
        levels = self._levels[state.role]
        if before < self.max_in_flight:
            levels[before].pop(state.instance_id, None)
        if after < self.max_in_flight:
            levels[after][state.instance_id] = None  # joins the end: longest at this level first

    def _send(self, state: InstanceState, work: Work) -> None:
        work.instance, work.sent_s = state.instance_id, self.clock()
        if not state.in_flight and (state.cancel_acked_s is None
                                    or work.sent_s - state.cancel_acked_s > self.stall_timeout_s):
            state.last_progress_s, state.cancel_acked_s = work.sent_s, None  # it was idle: a fresh start
        before = len(state.in_flight)
        state.in_flight[work.work_id] = work
        self._move(state, before)
        self._place(work, state.instance_id)
        self.backend.send(state.instance_id, work.work_id, work.inputs, spare=work.role != state.role)
        if self.on_send is not None:
            self.on_send(work)

    def _forget(self, work: Work) -> None:
        works = self._by_key.get((work.kind, work.key))
        if works is not None:
            if work in works:
                works.remove(work)
            if not works:
                del self._by_key[(work.kind, work.key)]

    def take(self, instance_id: int, work_id: int, *, failed: bool = False) -> Work | None:
        """The in-flight work an instance just answered (None if unknown). ``failed``: it came
        back without an output. A cancelled batch that comes back that way (a backend that
        aborts cancelled work, as Ray Serve does) is no sign of life: it does not reset the
        instance's silence, so an instance whose batches are all reconstructed and cancelled
        while it stalls is still found stalled."""
        state = self.instances.get(instance_id)
        if state is None or work_id not in state.in_flight:
            return None
        before = len(state.in_flight)
        work = state.in_flight.pop(work_id)
        if work.cancelled and failed:
            state.cancel_acked_s = self.clock()
        else:
            state.last_progress_s, state.cancel_acked_s = self.clock(), None
        self._forget(work)
        self._move(state, before)
        return work

    def drain(self, instance_id: int) -> list[Work]:
        """Everything in flight on a failed instance (it holds nothing afterwards)."""
        state = self.instances[instance_id]
        before = len(state.in_flight)
        works, state.in_flight = list(state.in_flight.values()), {}
        for work in works:
            self._forget(work)
        self._move(state, before)
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

    def in_service(self, work: Work) -> bool:
        """Whether ``work`` was sent and is still held by its instance (not answered, failed or cancelled)."""
        if work.instance is None or work.cancelled:
            return False
        return work.work_id in self.instances[work.instance].in_flight

    def stalled(self, now_s: float, timeout_s: float) -> list[int]:
        """Instances holding work that have been silent for more than ``timeout_s``: no answer
        since then, and busy all along (a batch queued behind another in a slow but working
        instance does not count against it)."""
        return [s.instance_id for s in self.instances.values()
                if s.in_flight and now_s - s.last_progress_s > timeout_s]

    def depth(self, role: str) -> int:
        """Queued, not cancelled work of ``role``."""
        return self._live.get(role, 0)
