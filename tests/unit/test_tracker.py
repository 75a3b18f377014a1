"""The group tracker over every arrival order, with exact parity outputs and a manual clock."""

from __future__ import annotations

import itertools

import pytest
import torch

from parm.coding import CodeConfig
from parm.serving.tracker import Answer, Cancel, GroupTracker, Resend
from parm.serving.types import Source

B, C = 3, 4


class ManualClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def _outputs(k: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    return [torch.randn(B, C, generator=g, dtype=torch.float64) for _ in range(k)]


def _setup(k: int) -> tuple[GroupTracker, list[torch.Tensor], torch.Tensor]:
    tracker = GroupTracker(CodeConfig(k=k), ManualClock())
    outs = _outputs(k)
    for b in range(k):
        gid, pos, full = tracker.add(b)
        assert (gid, pos, full) == (0, b, b == k - 1)
    return tracker, outs, sum(outs)  # the exact parity output: Σ F(X_j)


def _replay(tracker: GroupTracker, outs: list[torch.Tensor], parity: torch.Tensor, order) -> list:
    actions = []
    for event in order:
        if event == "P":
            actions += tracker.on_parity(0, 0, parity)
        elif isinstance(event, tuple) and event[0] == "fail":
            actions += tracker.on_failure(event[1])
        else:
            actions += tracker.on_output(event, outs[event])
    return actions


def _answers(actions) -> dict[int, Answer]:
    answers: dict[int, Answer] = {}
    for a in actions:
        if isinstance(a, Answer):
            assert a.batch_id not in answers, f"batch {a.batch_id} answered twice"
            answers[a.batch_id] = a
    return answers


@pytest.mark.parametrize("k", [2, 3, 4])
def test_every_arrival_order_of_all_outputs(k: int) -> None:
    """All k originals and the parity arrive, in every order: k answers, at most one reconstruction."""
    for order in itertools.permutations([*range(k), "P"]):
        tracker, outs, parity = _setup(k)
        actions = _replay(tracker, outs, parity, order)
        answers = _answers(actions)
        assert set(answers) == set(range(k))
        for b, a in answers.items():
            torch.testing.assert_close(a.outputs, outs[b])
        recon = [b for b, a in answers.items() if a.source is Source.RECONSTRUCTED]
        cancels = [a.batch_id for a in actions if isinstance(a, Cancel)]
        # a reconstruction happens exactly when the parity came before the last original
        expected = [order[-1]] if order[-1] != "P" else []
        assert recon == expected and cancels == expected
        assert tracker.late_originals == len(expected)
        assert len(tracker) == 0 and not tracker.pending_batches()


@pytest.mark.parametrize("k", [2, 3, 4])
def test_one_missing_is_reconstructed_in_any_order(k: int) -> None:
    for missing in range(k):
        present = [b for b in range(k) if b != missing]
        for order in itertools.permutations([*present, "P"]):
            tracker, outs, parity = _setup(k)
            actions = _replay(tracker, outs, parity, order)
            answers = _answers(actions)
            assert set(answers) == set(range(k))
            assert answers[missing].source is Source.RECONSTRUCTED
            torch.testing.assert_close(answers[missing].outputs, outs[missing])
            assert [a.batch_id for a in actions if isinstance(a, Cancel)] == [missing]
            assert not any(isinstance(a, Resend) for a in actions)
            assert len(tracker) == 0


@pytest.mark.parametrize("k", [2, 3, 4])
def test_two_missing_are_resent(k: int) -> None:
    for lost in itertools.combinations(range(k), 2):
        tracker, outs, parity = _setup(k)
        present = [b for b in range(k) if b not in lost]
        actions = _replay(tracker, outs, parity, [*present, "P"])
        assert set(_answers(actions)) == set(present)  # nothing decodable yet
        assert tracker.on_failure(lost[0]) == []  # one failure: the parity can still decode it
        second = tracker.on_failure(lost[1])  # two failures: no longer decodable, re-send both
        assert second == [Resend(lost[0]), Resend(lost[1])]
        retried = tracker.on_output(lost[0], outs[lost[0]])
        # with one of the two back, the parity decodes the other at once
        assert retried[0] == Answer(lost[0], outs[lost[0]], Source.RETRIED)
        assert retried[1].batch_id == lost[1] and retried[1].source is Source.RECONSTRUCTED
        torch.testing.assert_close(retried[1].outputs, outs[lost[1]])
        assert retried[2] == Cancel(lost[1]) and len(tracker) == 0


def test_failure_waits_for_decoder_when_group_can_decode() -> None:
    tracker, outs, parity = _setup(3)
    assert tracker.on_failure(1) == []  # parity and the others may still come
    actions = _replay(tracker, outs, parity, [0, 2])
    assert [a.source for a in actions if isinstance(a, Answer)] == [Source.ORIGINAL, Source.ORIGINAL]
    actions = tracker.on_parity(0, 0, parity)
    assert actions[0].source is Source.RECONSTRUCTED and actions[1] == Cancel(1)
    torch.testing.assert_close(actions[0].outputs, outs[1])


def test_failure_after_parity_failure_resends() -> None:
    tracker, outs, parity = _setup(2)
    assert tracker.on_parity_failure(0, 0) == []
    assert tracker.on_failure(0) == [Resend(0)]
    assert tracker.on_failure(0) == [Resend(0)]  # the re-sent copy's instance failed too
    assert tracker.on_output(0, outs[0]) == [Answer(0, outs[0], Source.RETRIED)]
    assert tracker.on_failure(1) == [Resend(1)]  # a later failure is re-sent again
    assert tracker.on_output(1, outs[1])[0].source is Source.RETRIED and len(tracker) == 0


def test_parity_failure_after_member_failure_resends_it() -> None:
    tracker, outs, parity = _setup(2)
    assert tracker.on_failure(1) == []
    assert tracker.on_parity_failure(0, 0) == [Resend(1)]


def test_partial_group_uses_filler_outputs() -> None:
    clock = ManualClock()
    tracker = GroupTracker(CodeConfig(k=4), clock)
    outs = _outputs(4)
    filler = torch.randn(B, C, dtype=torch.float64)
    tracker.add(10)
    tracker.add(11)
    assert tracker.open_group_age_s() == 0.0
    clock.now_s += 0.02
    assert tracker.open_group_age_s() == pytest.approx(0.02)
    assert tracker.close(filler) == (0, [10, 11])
    assert tracker.open_group_age_s() is None and tracker.close(filler) is None
    parity = outs[0] + outs[1] + 2 * filler  # positions 2, 3 hold zero queries
    tracker.on_output(11, outs[1])
    actions = tracker.on_parity(0, 0, parity)
    assert actions[0].batch_id == 10 and actions[0].source is Source.RECONSTRUCTED
    torch.testing.assert_close(actions[0].outputs, outs[0])
    assert len(tracker) == 0
    gid, pos, _ = tracker.add(12)  # a new group opens after the closed one
    assert (gid, pos) == (1, 0)


def test_expire_answers_with_error_once() -> None:
    tracker, outs, parity = _setup(2)
    assert tracker.expire(0) == [Answer(0, None, Source.ERROR)]
    assert tracker.expire(0) == []
    assert tracker.on_output(1, outs[1]) == [Answer(1, outs[1], Source.ORIGINAL)]
    assert len(tracker) == 0 and tracker.on_output(0, outs[0]) == []
    assert tracker.late_originals == 1


def test_r2_decodes_two_missing() -> None:
    code = CodeConfig(k=3, r=2)
    tracker = GroupTracker(code, ManualClock())
    outs = _outputs(3)
    for b in range(3):
        tracker.add(b)
    w = code.weights(torch.float64)
    parities = [sum(w[i, j] * outs[j] for j in range(3)) for i in range(2)]
    tracker.on_output(2, outs[2])
    assert tracker.on_parity(0, 0, parities[0]) == []  # two unknown, one parity
    actions = tracker.on_parity(0, 1, parities[1])
    answers = _answers(actions)
    assert set(answers) == {0, 1}
    for b in (0, 1):
        torch.testing.assert_close(answers[b].outputs, outs[b])


def test_duplicate_add_is_refused() -> None:
    tracker = GroupTracker(CodeConfig(k=2), ManualClock())
    tracker.add(1)
    with pytest.raises(ValueError, match="already tracked"):
        tracker.add(1)


def test_each_pool_has_its_own_open_group() -> None:
    """Tenant grouping: members of a group all come from one pool, and pools close apart."""
    tracker = GroupTracker(CodeConfig(k=2), clock=lambda: 0.0)
    assert tracker.add(0, "a") == (0, 0, False)
    assert tracker.add(1, "b") == (1, 0, False)
    assert tracker.add(2, "a") == (0, 1, True)  # a's group is full; b's is still open
    assert tracker.open_group("a") is None and tracker.open_group("b") == 1
    assert tracker.close(torch.zeros(1, 3), "a") is None
    assert tracker.close(torch.zeros(1, 3), "b") == (1, [1])
    assert tracker.add(3) == (2, 0, False)  # the pool None is a pool like any other
