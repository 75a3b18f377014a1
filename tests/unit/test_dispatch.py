"""The dispatcher's order and its handling of dead instances, through a recording backend.

Work goes to an idle instance before a busy one, to the one idle longest among idle ones, and
one batch per instance per turn; round robin moves a dead instance's queue to live instances.
"""

from __future__ import annotations

import torch

from parm.backends.base import Backend, InstanceSpec, ModelRef
from parm.serving.dispatch import Dispatcher, Work

REF = ModelRef(factory="parm.models.toy:constant")


class RecordingBackend(Backend):
    """Sends are recorded, never answered; the test answers with ``Dispatcher.take``."""

    def __init__(self, roles: list[str]) -> None:
        self.instances = [InstanceSpec(i, role, REF) for i, role in enumerate(roles)]
        self.up = {i: True for i in range(len(roles))}
        self.sent: list[tuple[int, int]] = []  # (instance, work id)

    async def start(self, on_result, on_failure, on_ready) -> None:  # pragma: no cover - not used
        pass

    def send(self, instance_id: int, work_id: int, inputs: torch.Tensor) -> None:
        self.sent.append((instance_id, work_id))

    def healthy(self, instance_id: int) -> bool:
        return self.up[instance_id]

    def kill(self, instance_id: int, reason: str) -> None:
        self.up[instance_id] = False

    async def stop(self) -> None:  # pragma: no cover - not used
        pass


def make(roles: list[str], dispatch: str = "shared", max_in_flight: int = 2) -> tuple[Dispatcher, RecordingBackend]:
    backend = RecordingBackend(roles)
    clock = iter(range(10**6)).__next__  # a manual clock: every read is one tick later
    return Dispatcher(backend, max_in_flight, dispatch, lambda: float(clock())), backend


def work(d: Dispatcher, key: int, role: str = "data", **kw) -> Work:
    return Work(d.new_id(), "data" if role == "data" else role, key, role, torch.zeros(1, 1), **kw)


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
