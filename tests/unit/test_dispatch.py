"""The dispatcher's order and its handling of dead instances, through a recording backend.

Work goes to an idle instance before a busy one, to the one idle longest among idle ones, and
one batch per instance per turn; round robin moves a dead instance's queue to live instances.
Coding groups are placed apart: a group's data batches on distinct instances, its parity batch
outside its members' failure domains, always falling back rather than leaving an instance idle.
"""

from __future__ import annotations

import random

import torch

from parm.backends.base import Backend, InstanceSpec, ModelRef
from parm.serving.dispatch import Dispatcher, Work

REF = ModelRef(factory="parm.models.toy:constant")


class RecordingBackend(Backend):
    """Sends are recorded, never answered; the test answers with ``Dispatcher.take``."""

    def __init__(self, roles: list[str], zones: list[str | None] | None = None, spares: frozenset[int] = frozenset()
                 ) -> None:
        zones = zones or [None] * len(roles)
        self.instances = [InstanceSpec(i, role, REF, zone=zone, spare=REF if i in spares else None)
                          for i, (role, zone) in enumerate(zip(roles, zones))]
        self.up = {i: True for i in range(len(roles))}
        self.sent: list[tuple[int, int]] = []  # (instance, work id)
        self.spare_sent: list[int] = []  # work ids sent to run on the instance's spare model

    async def start(self, on_result, on_failure, on_ready) -> None:  # pragma: no cover - not used
        pass

    def send(self, instance_id: int, work_id: int, inputs: torch.Tensor, *, spare: bool = False) -> None:
        self.sent.append((instance_id, work_id))
        if spare:
            self.spare_sent.append(work_id)

    def healthy(self, instance_id: int) -> bool:
        return self.up[instance_id]

    def kill(self, instance_id: int, reason: str) -> None:
        self.up[instance_id] = False

    async def stop(self) -> None:  # pragma: no cover - not used
        pass


def make(roles: list[str], dispatch: str = "shared", max_in_flight: int = 2, zones: list[str | None] | None = None,
         spares: frozenset[int] = frozenset(), **kw) -> tuple[Dispatcher, RecordingBackend]:
    backend = RecordingBackend(roles, zones, spares)
    clock = iter(range(10**6)).__next__  # a manual clock: every read is one tick later
    return Dispatcher(backend, max_in_flight, dispatch, lambda: float(clock()), **kw), backend


def work(d: Dispatcher, key: int, role: str = "data", **kw) -> Work:
    return Work(d.new_id(), "data" if role == "data" else role, key, role, torch.zeros(1, 1), **kw)


def where(backend: RecordingBackend, w: Work) -> int | None:
    """The instance ``w`` was sent to (None while it is queued)."""
    return next((i for i, work_id in backend.sent if work_id == w.work_id), None)


def test_two_batches_and_two_idle_instances_give_one_batch_to_each() -> None:
    d, backend = make(["data"] * 3)
    d.submit(work(d, 0))  # instance 0 busy with one batch (one free slot left)
    first = backend.sent[-1][0]
    d.pump("data")
    w1, w2 = work(d, 1), work(d, 2)
    d._queues["data"].extend([w1, w2])  # both queued at once, then one pump
    d._live["data"] += 2
    d.pump("data")
    targets = [i for i, _ in backend.sent[1:]]
    assert sorted(targets) == sorted({0, 1, 2} - {first}), "an idle instance was passed over for a busy one"


def test_at_low_load_batches_rotate_over_instances_longest_idle_first() -> None:
    d, backend = make(["data"] * 3)
    for key in range(9):  # one batch at a time: each is answered before the next arrives
        d.submit(work(d, key))
        instance, work_id = backend.sent[-1]
        assert d.take(instance, work_id) is not None
    assert [i for i, _ in backend.sent] == [0, 1, 2] * 3


def test_a_busy_instance_gets_a_second_batch_only_when_none_is_idle() -> None:
    d, backend = make(["data"] * 3)
    for key in range(3):
        d.submit(work(d, key))
    assert sorted(i for i, _ in backend.sent) == [0, 1, 2]
    d.take(*backend.sent[1])  # instance 1 answers: it is now the only idle one
    d.submit(work(d, 3))
    assert backend.sent[-1][0] == 1
    d.submit(work(d, 4))  # none idle: the least busy, the one that reached one batch first
    assert backend.sent[-1][0] in (0, 2)
    assert all(len(s.in_flight) <= 2 for s in d.instances.values())


def test_idle_order_is_longest_idle_first() -> None:
    d, backend = make(["data"] * 3)
    assert d.idle_order("data") == [0, 1, 2]
    d.submit(work(d, 0))
    d.take(*backend.sent[-1])
    assert d.idle_order("data") == [1, 2, 0]


def test_round_robin_moves_a_dead_instance_queue_to_a_live_one() -> None:
    d, backend = make(["data"] * 2, dispatch="round_robin", max_in_flight=1)
    for key in range(4):  # two each: one in flight, one queued behind it
        d.submit(work(d, key))
    assert sorted(i for i, _ in backend.sent) == [0, 1]
    backend.up[1] = False  # instance 1 dies and its restart is blocked
    lost = d.drain(1)
    assert len(lost) == 1
    d.pump("data")
    assert not d._own[1], "work stayed queued for a dead instance"
    for _ in range(2):  # instance 0 answers and runs, in turn, its own queued work and instance 1's
        d.take(*next((i, w) for i, w in backend.sent if i == 0 and w in d.instances[0].in_flight))
        d.pump("data")
    sent_to_0 = [i for i, _ in backend.sent].count(0)
    assert sent_to_0 == 3 and d.depth("data") == 0


def test_round_robin_resend_pinned_to_an_avoided_instance_moves_when_another_recovers() -> None:
    d, backend = make(["data"] * 2, dispatch="round_robin", max_in_flight=1)
    d.submit(work(d, 0))  # the cycle moves on: the next target would be instance 1
    for i in (0, 1):  # both go down; the batch is re-sent, to avoid instance 1 where it also failed
        backend.up[i] = False
        d.drain(i)
    resend = work(d, 7, retry=True, avoid=frozenset({1}))
    d.submit(resend)
    assert len(backend.sent) == 1
    backend.up[0] = True  # instance 0 comes back; 1 stays down (its restart is blocked)
    d.pump("data")
    assert backend.sent[1:] == [(0, resend.work_id)]


# ---- placement of coding groups ----------------------------------------------------------------
def test_members_of_a_group_in_service_go_to_distinct_instances() -> None:
    """Instance 0 holds a group's first member and was the first to reach one batch in flight; the
    others each hold an unrelated batch: the second member goes to one of them, not to instance 0."""
    d, backend = make(["data"] * 4)
    first = work(d, 0, group=0)
    d.submit(first)
    for key in range(3):
        d.submit(work(d, 100 + key))
    assert [i for i, _ in backend.sent] == [0, 1, 2, 3]
    second = work(d, 1, group=0)
    d.submit(second)
    assert where(backend, second) == 1


def test_an_answered_member_does_not_keep_its_sibling_off_an_idle_instance() -> None:
    """Shared dispatch counts only members in service: instance 0 answered the first member and is
    idle, so it takes the second (its output is known; nothing is lost if instance 0 fails now)."""
    d, backend = make(["data"] * 2)
    first = work(d, 0, group=0)
    d.submit(first)
    d.submit(work(d, 100))
    d.take(0, first.work_id)
    second = work(d, 1, group=0)
    d.submit(second)
    assert where(backend, second) == 0


def test_a_member_goes_to_the_instance_of_its_sibling_only_when_no_other_can_take_it() -> None:
    """Instance 0 holds a group's first member; instance 1 is busy but has room (it takes the
    second member), or is full or down (instance 0 takes it: never left waiting)."""
    for other, expected in (("free", 1), ("full", 0), ("down", 0)):
        d, backend = make(["data"] * 2)
        first = work(d, 0, group=0)
        d.submit(first)
        d.submit(work(d, 100))
        assert [i for i, _ in backend.sent] == [0, 1]
        if other == "full":
            d.submit(work(d, 101, avoid=frozenset({0})))  # instance 1's second slot
            assert len(d.instances[1].in_flight) == 2
        elif other == "down":
            backend.up[1] = False
        second = work(d, 1, group=0)
        d.submit(second)
        assert where(backend, second) == expected and d.depth("data") == 0, other


def test_fewer_data_instances_than_k_still_run_every_member_at_once() -> None:
    d, backend = make(["data"] * 2, max_in_flight=2)
    members = [work(d, key, group=0) for key in range(3)]
    for m in members:
        d.submit(m)
    assert [where(backend, m) for m in members] == [0, 1, 0] and d.depth("data") == 0
    again = work(d, 3, group=0)  # a fourth batch of the group, both instances now holding members ...
    d.take(1, members[1].work_id)
    d.submit(again)
    assert where(backend, again) == 1  # ... goes to the one with a free slot


PARITY_ROLES = ["data", "data", "parity", "parity"]


def parity(d: Dispatcher, group: int) -> Work:
    return Work(d.new_id(), "parity", group, "parity", torch.zeros(1, 1), group=group)


def test_parity_goes_to_a_parity_instance_outside_the_zones_of_its_members() -> None:
    """Both parity instances idle; whichever is idle longest, the one in zone b takes the parity."""
    for parity_zones in (("a", "b"), ("b", "a")):  # the same-zone instance idle longest, then the other
        d, backend = make(PARITY_ROLES, zones=["a", "a", *parity_zones])
        assert d.idle_order("parity") == [2, 3]
        members = [work(d, key, group=0) for key in range(2)]
        for m in members:
            d.submit(m)
        assert {where(backend, m) for m in members} == {0, 1}  # both members in zone a
        p = parity(d, 0)
        d.submit(p)
        target = where(backend, p)
        assert target is not None and backend.instances[target].zone == "b", parity_zones


def test_a_same_zone_idle_longest_parity_instance_is_passed_over_each_time() -> None:
    """Both parity instances idle, the one in the members' zone idle longest, group after group."""
    d, backend = make(PARITY_ROLES, zones=["a", "a", "a", "b"])
    for group in range(4):
        members = [work(d, 2 * group + j, group=group) for j in range(2)]
        for m in members:
            d.submit(m)
        p = parity(d, group)
        d.submit(p)
        assert where(backend, p) == 3
        for w in (*members, p):
            d.take(where(backend, w), w.work_id)  # type: ignore[arg-type]
        assert d.idle_order("parity")[0] == 2  # instance 2 idle longest again


def test_parity_falls_back_to_the_members_zone_when_no_other_parity_instance_has_room() -> None:
    d, backend = make(PARITY_ROLES, max_in_flight=1, zones=["a", "a", "a", "b"])
    parities = []
    for group in range(2):
        for j in range(2):
            m = work(d, 2 * group + j, group=group)
            d.submit(m)
            d.take(where(backend, m), m.work_id)  # type: ignore[arg-type]
        parities.append(parity(d, group))
        d.submit(parities[-1])
    # the first goes to zone b; the second finds it full and takes instance 2 (zone a) at once
    assert [where(backend, p) for p in parities] == [3, 2] and d.depth("parity") == 0


def test_parity_of_a_group_spread_over_every_zone_goes_to_the_instance_idle_longest() -> None:
    d, backend = make(["data", "data", "parity", "parity"], zones=["a", "b", "b", "a"])
    for key in range(2):
        d.submit(work(d, key, group=0))
    p = parity(d, 0)
    d.submit(p)
    assert where(backend, p) == 2


def test_round_robin_keeps_a_group_apart() -> None:
    d, backend = make(["data"] * 3, dispatch="round_robin", max_in_flight=1)
    first = work(d, 0, group=0)
    d.submit(first)
    assert first.target == 0
    d.submit(work(d, 100, avoid=frozenset({1})))  # a re-send avoiding instance 1 takes instance 2: the cycle is at 0
    second = work(d, 1, group=0)
    d.submit(second)
    assert second.target == 1, "round robin put both members of a group on one instance"


def test_round_robin_sends_parity_outside_the_zones_of_its_members() -> None:
    roles = ["data"] * 4 + ["parity"] * 2
    d, backend = make(roles, dispatch="round_robin", zones=["a", "a", "b", "b", "a", "b"])
    targets = []
    for group in range(4):  # the cycle puts groups 0 and 2 on instances 0, 1 (zone a), 1 and 3 on 2, 3 (zone b)
        for j in range(2):
            d.submit(work(d, 2 * group + j, group=group))
        p = parity(d, group)
        d.submit(p)
        targets.append(p.target)
    assert targets == [5, 4, 5, 4]


def test_the_record_of_group_placements_stays_bounded() -> None:
    d, backend = make(["data"] * 3, group_memory=8)
    for group in range(100):
        for j in range(2):
            m = work(d, 2 * group + j, group=group)
            d.submit(m)
            d.take(where(backend, m), m.work_id)  # type: ignore[arg-type]
        assert len(d._groups) <= 8
    assert d.placed(0) is None and d.placed(99) is not None  # the least recently placed are forgotten
    assert len(d.placed(99).instances) == 2  # type: ignore[union-attr]


def test_group_placement_is_work_conserving() -> None:
    """Random arrivals and answers: no batch is ever queued while an instance of its role has room."""
    rng = random.Random(0)
    roles, zones = ["data"] * 4 + ["parity"] * 2, ["a", "a", "b", "b", "a", "b"]
    d, backend = make(roles, max_in_flight=2, zones=zones)  # type: ignore[arg-type]
    group = 0
    for _ in range(2000):
        if rng.random() < 0.4:
            for j in range(2):
                d.submit(work(d, 2 * group + j, group=group))
            d.submit(parity(d, group))
            group += 1
        else:
            busy = [(i, wid) for i, s in d.instances.items() for wid in s.in_flight]
            if busy:
                instance, work_id = rng.choice(busy)
                d.take(instance, work_id)
                d.pump(roles[instance])
        for role in ("data", "parity"):
            if d.depth(role):
                assert all(len(s.in_flight) == 2 for s in d.instances.values() if s.role == role)


# ---- spare capacity: parity instances that also hold the deployed model --------------------------
def test_an_idle_spare_instance_takes_data_work_only_after_the_data_instances_are_full() -> None:
    d, backend = make(["data", "parity"], max_in_flight=1, spares=frozenset({1}))
    works = [work(d, key) for key in range(3)]
    for w in works:
        d.submit(w)
    assert [i for i, _ in backend.sent] == [0, 1]  # data instance first, then the idle spare; one waits
    assert backend.spare_sent == [works[1].work_id] and d.depth("data") == 1


def test_a_spare_instance_takes_queued_data_work_before_its_own() -> None:
    d, backend = make(["data", "parity"], max_in_flight=1, spares=frozenset({1}))
    busy = work(d, 0)
    d.submit(busy)  # instance 0 busy
    parity = Work(d.new_id(), "parity", 0, "parity", torch.zeros(1, 1))
    d.submit(parity)  # the parity instance busy with parity work
    older_parity = Work(d.new_id(), "parity", 1, "parity", torch.zeros(1, 1))
    d.submit(older_parity)
    data = work(d, 1)
    d.submit(data)  # queued after the parity batch: every data instance is full
    d.take(1, parity.work_id)
    d.pump("parity")  # as the frontend does after every outcome
    assert where(backend, data) == 1 and where(backend, older_parity) is None  # the waiting data batch first
    assert backend.spare_sent == [data.work_id]
    d.take(1, data.work_id)
    d.pump("data")
    assert where(backend, older_parity) == 1  # no data waiting: its own work


def test_a_busy_spare_instance_without_work_of_its_own_leaves_data_work_to_the_data_instances() -> None:
    d, backend = make(["data", "parity"], max_in_flight=2, spares=frozenset({1}))
    d.submit(work(d, 0))
    d.submit(work(d, 1))  # instance 0 full
    d.submit(Work(d.new_id(), "parity", 0, "parity", torch.zeros(1, 1)))  # instance 1 busy, one slot free
    waiting = work(d, 2)
    d.submit(waiting)
    assert where(backend, waiting) is None and d.depth("data") == 1
    d.submit(Work(d.new_id(), "parity", 1, "parity", torch.zeros(1, 1)))  # now it has work of its own queued
    assert where(backend, waiting) == 1 and d.depth("parity") == 1


def test_without_a_spare_model_a_parity_instance_never_takes_data_work() -> None:
    d, backend = make(["data", "parity"], max_in_flight=1)
    for key in range(3):
        d.submit(work(d, key))
    assert [i for i, _ in backend.sent] == [0] and d.depth("data") == 2
